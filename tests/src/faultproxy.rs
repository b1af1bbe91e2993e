//! A fault-injecting TCP proxy on 127.0.0.1, put between the programs and the S3 server to
//! see how the object store layer and the archiver ride out a bad network and a struggling
//! store.
//!
//! Every new connection is either passed through to the upstream (a bidirectional copy,
//! optionally reset after a maximum lifetime so that keep-alive connections keep meeting
//! faults) or gets one fault, chosen with a seeded random generator at the rate the current
//! [`FaultPlan`] says:
//!
//! - [`FaultKind::Reset`]: reset at once (`SO_LINGER` 0, then closed).
//! - [`FaultKind::SlowDown`] / [`FaultKind::InternalError`]: the first request is read and
//!   answered with an S3 XML error (`503 SlowDown` / `500 InternalError`) and
//!   `Connection: close`.
//! - [`FaultKind::Stall`]: everything sent is read and nothing is answered, for
//!   [`FaultPlan::stall`]; then the connection is closed.
//! - [`FaultKind::Cut`]: passed through, but reset on both sides after a few bytes or a
//!   short time, mid-request or mid-response, wherever that happens to be.
//! - [`FaultKind::LostReply`]: the request reaches the server whole, the reply is reset
//!   before it is complete: the store did the work, the client cannot know.
//!
//! Apart from faults, [`FaultPlan::strip_conditional`] makes the store behind the proxy one
//! that ignores conditional writes: `If-None-Match` and `If-Match` are removed from every
//! request (which is then signed again, [`StripConditional`]), and counted in
//! [`FaultCounts::stripped`].
//!
//! The plan can be changed while the proxy runs ([`FaultProxy::set_plan`]); it applies to new
//! connections, and [`FaultProxy::reset_open`] resets the ones already open, so that pooled
//! connections meet the new plan at once (a store that goes down takes its open connections
//! with it). [`FaultCounts`] tells what was injected.
//!
//! Faults are chosen per connection. Against a server that closes every connection after
//! one answer (moto does: `Connection: close`) that is per request; against one that keeps
//! connections alive, [`FaultPlan::max_lifetime`] and [`FaultProxy::reset_open`] keep the
//! faults coming.
//!
//! The proxy runs on its own thread and runtime, listens on loopback only, forwards to a
//! loopback upstream only, and stops (closing every connection) when dropped.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One kind of fault a connection can get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Reset at once.
    Reset,
    /// The first request is answered `503 SlowDown`, then the connection is closed.
    SlowDown,
    /// The first request is answered `500 InternalError`, then the connection is closed.
    InternalError,
    /// Read, never answered, closed after [`FaultPlan::stall`].
    Stall,
    /// Passed through, then reset on both sides after a random number of bytes in
    /// [`FaultPlan::cut_bytes`] (both directions counted) or a random time in
    /// [`FaultPlan::cut_after`], whichever comes first: mid-request or mid-response.
    Cut,
    /// The request is passed through whole; of the reply, a random number of bytes up to
    /// [`FaultPlan::reply_bytes`] is passed on, then both sides are reset.
    LostReply,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Reset,
        FaultKind::SlowDown,
        FaultKind::InternalError,
        FaultKind::Stall,
        FaultKind::Cut,
        FaultKind::LostReply,
    ];

    /// The name used on command lines and in messages.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Reset => "reset",
            FaultKind::SlowDown => "slowdown",
            FaultKind::InternalError => "internal",
            FaultKind::Stall => "stall",
            FaultKind::Cut => "cut",
            FaultKind::LostReply => "lost-reply",
        }
    }

    /// Parses [`FaultKind::name`].
    pub fn parse(name: &str) -> Result<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .with_context(|| {
                format!(
                    "unknown fault kind {name:?}; use one of {}",
                    FaultKind::ALL.map(FaultKind::name).join(", ")
                )
            })
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the proxy does to new connections.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Probability (0 to 1) that a new connection gets a fault.
    pub rate: f64,
    /// The faults to choose from, with their relative weights.
    pub kinds: Vec<(FaultKind, u32)>,
    /// How long a stalled connection is held before it is closed.
    pub stall: Duration,
    /// A cut connection is reset once a random number of bytes in
    /// `cut_bytes.0..=cut_bytes.1` has passed (both directions counted)…
    pub cut_bytes: (u64, u64),
    /// … or after a random time in `cut_after.0..=cut_after.1`, whichever comes first.
    pub cut_after: (Duration, Duration),
    /// A lost reply passes on a random `0..=reply_bytes` bytes of the reply before the
    /// reset (the default, 200, lands in the status line or the headers).
    pub reply_bytes: u64,
    /// Connections passed through without a fault are reset after this long (`None`:
    /// never), so that clients keeping connections alive meet the faults too.
    pub max_lifetime: Option<Duration>,
    /// Remove the conditional headers of every request passed through: the store then
    /// ignores `If-None-Match` and `If-Match`, as some S3-compatible servers do.
    pub strip_conditional: Option<StripConditional>,
}

/// How [`FaultPlan::strip_conditional`] sends a request it removed headers from. The
/// headers are part of the request's SigV4 signature, so a server that checks signatures
/// needs the request signed again, with the secret key of the access key that signed it.
/// Only the first request of a connection is looked at; it gets `Connection: close`, so
/// that every request comes on a connection of its own.
#[derive(Clone, PartialEq)]
pub struct StripConditional {
    secret_key: Option<String>,
}

impl StripConditional {
    /// Sends the requests unsigned again (for a server that does not check signatures).
    pub fn without_signing() -> StripConditional {
        StripConditional { secret_key: None }
    }

    /// Signs the requests again with this secret key.
    pub fn signing_with(secret_key: impl Into<String>) -> StripConditional {
        StripConditional {
            secret_key: Some(secret_key.into()),
        }
    }

    /// Signs with `AWS_SECRET_ACCESS_KEY` when it is set (the test server's key).
    pub fn from_env() -> StripConditional {
        match std::env::var("AWS_SECRET_ACCESS_KEY") {
            Ok(secret) if !secret.is_empty() => StripConditional::signing_with(secret),
            _ => StripConditional::without_signing(),
        }
    }
}

impl fmt::Debug for StripConditional {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripConditional")
            .field("signs_again", &self.secret_key.is_some())
            .finish()
    }
}

impl FaultPlan {
    /// No faults: every connection passes through, for as long as it likes.
    pub fn none() -> FaultPlan {
        FaultPlan {
            rate: 0.0,
            kinds: Vec::new(),
            stall: Duration::from_secs(2),
            cut_bytes: (50, 3000),
            cut_after: (Duration::from_millis(20), Duration::from_millis(500)),
            reply_bytes: 200,
            max_lifetime: None,
            strip_conditional: None,
        }
    }

    /// No faults, and a store that ignores conditional writes.
    pub fn stripping_conditional(strip: StripConditional) -> FaultPlan {
        FaultPlan {
            strip_conditional: Some(strip),
            ..FaultPlan::none()
        }
    }

    /// The store is down: every connection is reset.
    pub fn down() -> FaultPlan {
        FaultPlan {
            rate: 1.0,
            kinds: vec![(FaultKind::Reset, 1)],
            ..FaultPlan::none()
        }
    }

    /// Every kind of fault, equally likely, on a share `rate` of new connections; stalls
    /// of `stall`; cuts after 50 B to 3000 B or 20 to 500 ms; healthy connections live at
    /// most a second.
    pub fn mixed(rate: f64, stall: Duration) -> FaultPlan {
        FaultPlan {
            rate,
            kinds: FaultKind::ALL.iter().map(|k| (*k, 1)).collect(),
            stall,
            max_lifetime: Some(Duration::from_secs(1)),
            ..FaultPlan::none()
        }
    }

    /// The kinds with a non-zero weight.
    pub fn enabled(&self) -> Vec<FaultKind> {
        self.kinds
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.rate),
            "fault rate {} is not between 0 and 1",
            self.rate
        );
        ensure!(
            self.rate == 0.0 || !self.enabled().is_empty(),
            "a fault rate of {} needs at least one fault kind",
            self.rate
        );
        ensure!(
            self.cut_bytes.0 <= self.cut_bytes.1,
            "cut_bytes: {} is more than {}",
            self.cut_bytes.0,
            self.cut_bytes.1
        );
        ensure!(
            self.cut_after.0 <= self.cut_after.1,
            "cut_after: {:?} is more than {:?}",
            self.cut_after.0,
            self.cut_after.1
        );
        Ok(())
    }
}

/// What the proxy did, so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Connections accepted.
    pub connections: u64,
    /// Connections passed through without a fault.
    pub passed: u64,
    /// Connections reset at once.
    pub reset: u64,
    /// Requests answered `503 SlowDown`.
    pub slow_down: u64,
    /// Requests answered `500 InternalError`.
    pub internal_error: u64,
    /// Connections stalled.
    pub stalled: u64,
    /// Connections reset mid-stream ([`FaultKind::Cut`]).
    pub cut: u64,
    /// Connections chosen to be cut whose exchange ended first (no fault happened).
    pub cut_missed: u64,
    /// Replies reset before they were complete ([`FaultKind::LostReply`]).
    pub lost_reply: u64,
    /// Healthy connections reset at [`FaultPlan::max_lifetime`].
    pub expired: u64,
    /// Open connections reset by [`FaultProxy::reset_open`].
    pub reset_open: u64,
    /// Connections that could not reach the upstream (reset).
    pub upstream_failed: u64,
    /// Requests whose conditional headers were removed ([`FaultPlan::strip_conditional`]).
    pub stripped: u64,
}

impl FaultCounts {
    /// How many connections got a fault of `kind`.
    pub fn of(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::Reset => self.reset,
            FaultKind::SlowDown => self.slow_down,
            FaultKind::InternalError => self.internal_error,
            FaultKind::Stall => self.stalled,
            FaultKind::Cut => self.cut,
            FaultKind::LostReply => self.lost_reply,
        }
    }

    /// Every connection the proxy broke on purpose.
    pub fn faults(&self) -> u64 {
        FaultKind::ALL.iter().map(|k| self.of(*k)).sum::<u64>() + self.expired + self.reset_open
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections: {} passed, {} reset, {} answered 503 SlowDown, {} answered 500 \
             InternalError, {} stalled, {} cut mid-stream ({} more ended before their cut), {} \
             replies lost, {} reset at their maximum lifetime, {} reset while open by a plan change, {} could \
             not reach the upstream, {} requests stripped of their conditional headers",
            self.connections,
            self.passed,
            self.reset,
            self.slow_down,
            self.internal_error,
            self.stalled,
            self.cut,
            self.cut_missed,
            self.lost_reply,
            self.expired,
            self.reset_open,
            self.upstream_failed,
            self.stripped
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    passed: AtomicU64,
    reset: AtomicU64,
    slow_down: AtomicU64,
    internal_error: AtomicU64,
    stalled: AtomicU64,
    cut: AtomicU64,
    cut_missed: AtomicU64,
    lost_reply: AtomicU64,
    expired: AtomicU64,
    reset_open: AtomicU64,
    upstream_failed: AtomicU64,
    stripped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> FaultCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultCounts {
            connections: get(&self.connections),
            passed: get(&self.passed),
            reset: get(&self.reset),
            slow_down: get(&self.slow_down),
            internal_error: get(&self.internal_error),
            stalled: get(&self.stalled),
            cut: get(&self.cut),
            cut_missed: get(&self.cut_missed),
            lost_reply: get(&self.lost_reply),
            expired: get(&self.expired),
            reset_open: get(&self.reset_open),
            upstream_failed: get(&self.upstream_failed),
            stripped: get(&self.stripped),
        }
    }
}

/// What happens to one connection.
#[derive(Debug, Clone, Copy)]
enum Decision {
    /// Pass through; reset after the lifetime or a byte budget (of both directions, or of
    /// the reply), if any; `fault` says which fault that is (`None`: a healthy connection).
    Pass {
        lifetime: Option<Duration>,
        budget: Option<u64>,
        reply_budget: Option<u64>,
        fault: Option<FaultKind>,
    },
    Reset,
    Error(FaultKind),
    Stall(Duration),
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    plan: Mutex<(FaultPlan, StdRng)>,
    counters: Counters,
    /// Bumped by [`FaultProxy::reset_open`]; open connections reset when it changes.
    epoch: watch::Sender<u64>,
    next_request_id: AtomicU64,
}

impl Shared {
    fn decide(&self) -> Decision {
        let mut guard = self.plan.lock().expect("fault plan lock");
        let (plan, rng) = &mut *guard;
        let total: u64 = plan.kinds.iter().map(|(_, w)| u64::from(*w)).sum();
        if plan.rate <= 0.0 || total == 0 || rng.random::<f64>() >= plan.rate {
            return Decision::Pass {
                lifetime: plan.max_lifetime,
                budget: None,
                reply_budget: None,
                fault: None,
            };
        }
        let mut pick = rng.random_range(0..total);
        let mut kind = plan.kinds[0].0;
        for (k, w) in &plan.kinds {
            if pick < u64::from(*w) {
                kind = *k;
                break;
            }
            pick -= u64::from(*w);
        }
        match kind {
            FaultKind::Reset => Decision::Reset,
            FaultKind::SlowDown | FaultKind::InternalError => Decision::Error(kind),
            FaultKind::Stall => Decision::Stall(plan.stall),
            FaultKind::Cut => {
                let (lo, hi) = plan.cut_after;
                let span = u64::try_from((hi - lo).as_micros()).unwrap_or(u64::MAX);
                Decision::Pass {
                    lifetime: Some(lo + Duration::from_micros(rng.random_range(0..=span))),
                    budget: Some(rng.random_range(plan.cut_bytes.0..=plan.cut_bytes.1)),
                    reply_budget: None,
                    fault: Some(kind),
                }
            }
            FaultKind::LostReply => Decision::Pass {
                lifetime: None,
                budget: None,
                reply_budget: Some(rng.random_range(0..=plan.reply_bytes)),
                fault: Some(kind),
            },
        }
    }
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream` (`http://HOST:PORT`
    /// or `HOST:PORT`, on loopback), with `plan` and the random generator seeded with `seed`.
    pub fn start(upstream: &str, plan: FaultPlan, seed: u64) -> Result<FaultProxy> {
        FaultProxy::start_on("127.0.0.1:0".parse()?, upstream, plan, seed)
    }

    /// Like [`FaultProxy::start`], listening on `listen` (a loopback address).
    pub fn start_on(
        listen: SocketAddr,
        upstream: &str,
        plan: FaultPlan,
        seed: u64,
    ) -> Result<FaultProxy> {
        ensure!(
            listen.ip().is_loopback(),
            "the fault proxy listens on loopback only, not {listen}"
        );
        plan.validate()?;
        let upstream = parse_upstream(upstream)?;
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new((plan, StdRng::seed_from_u64(seed))),
            counters: Counters::default(),
            epoch: watch::channel(0).0,
            next_request_id: AtomicU64::new(1),
        });
        let (stop, stop_rx) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the fault proxy's runtime")?;
        let shared2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("faultproxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => accept_loop(listener, shared2, stop_rx).await,
                        Err(e) => eprintln!("fault proxy on {addr}: {e}"),
                    }
                });
                // Drops every connection task (and so every socket) still running.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })?;
        Ok(FaultProxy {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for an endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The upstream it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The plan in force.
    pub fn plan(&self) -> FaultPlan {
        self.shared.plan.lock().expect("fault plan lock").0.clone()
    }

    /// Replaces the plan for new connections (the random generator keeps its state).
    pub fn set_plan(&self, plan: FaultPlan) -> Result<()> {
        plan.validate()?;
        self.shared.plan.lock().expect("fault plan lock").0 = plan;
        Ok(())
    }

    /// Resets every connection open now (passed-through and cut ones), so that clients
    /// keeping connections alive meet the current plan on their next request.
    pub fn reset_open(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// What was done so far.
    pub fn counts(&self) -> FaultCounts {
        self.shared.counters.snapshot()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `http://HOST:PORT[/…]` or `HOST:PORT` → a loopback socket address.
fn parse_upstream(upstream: &str) -> Result<SocketAddr> {
    let rest = upstream
        .strip_prefix("http://")
        .unwrap_or(upstream)
        .trim_end_matches('/');
    ensure!(
        !rest.contains("://"),
        "upstream {upstream:?}: only http:// is supported"
    );
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .with_context(|| format!("upstream {upstream:?} is not HOST:PORT"))?
        .collect();
    match addrs.iter().find(|a| a.ip().is_loopback()) {
        Some(a) => Ok(*a),
        None => {
            bail!("upstream {upstream:?} is not on loopback; the fault proxy stays on 127.0.0.1")
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or similar: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        bump(&shared.counters.connections);
        let decision = shared.decide();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = handle(client, decision, &shared).await;
        });
    }
}

/// Closes a socket with a reset rather than a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn handle(client: TcpStream, decision: Decision, shared: &Shared) -> io::Result<()> {
    let counters = &shared.counters;
    match decision {
        Decision::Reset => {
            bump(&counters.reset);
            reset(client);
            Ok(())
        }
        Decision::Error(kind) => {
            bump(match kind {
                FaultKind::SlowDown => &counters.slow_down,
                _ => &counters.internal_error,
            });
            let id = shared.next_request_id.fetch_add(1, Ordering::Relaxed);
            answer_error(client, kind, id).await
        }
        Decision::Stall(d) => {
            bump(&counters.stalled);
            stall(client, d).await
        }
        Decision::Pass {
            lifetime,
            budget,
            reply_budget,
            fault,
        } => {
            if fault.is_none() {
                bump(&counters.passed);
            }
            pass(client, lifetime, [budget, reply_budget], fault, shared).await
        }
    }
}

/// How a passed-through connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Both sides closed (or one failed): closed normally.
    Done,
    /// The byte budget was used up.
    Budget,
    /// The lifetime ended.
    Lifetime,
    /// [`FaultProxy::reset_open`] was called.
    ResetOpen,
    /// A side failed (reset by the peer, say): both are closed.
    Failed,
}

/// A byte budget: how many bytes have moved so far, and how many may.
#[derive(Debug, Clone, Copy)]
struct Budget<'a> {
    moved: &'a AtomicU64,
    limit: Option<u64>,
}

/// Copies one direction until end of stream (then half-closes the other side) or until one
/// of the budgets is used up (then stops, having written exactly up to it).
async fn copy_one_way<R, W>(mut from: R, mut to: W, budgets: [Budget<'_>; 2]) -> io::Result<Ending>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(Ending::Done);
        }
        let mut allowed = n;
        let mut used_up = false;
        for b in budgets {
            let before = b.moved.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(limit) = b.limit
                && before + n as u64 >= limit
            {
                let left = usize::try_from(limit.saturating_sub(before)).unwrap_or(n);
                allowed = allowed.min(left);
                used_up = true;
            }
        }
        to.write_all(&buf[..allowed]).await?;
        if used_up {
            to.flush().await?;
            return Ok(Ending::Budget);
        }
    }
}

/// Passes traffic both ways until both sides close, or resets both sides when a byte
/// budget (`[both directions, reply]`) or the lifetime is used up or
/// [`FaultProxy::reset_open`] is called.
async fn pass(
    mut client: TcpStream,
    lifetime: Option<Duration>,
    [budget, reply_budget]: [Option<u64>; 2],
    fault: Option<FaultKind>,
    shared: &Shared,
) -> io::Result<()> {
    let counters = &shared.counters;
    let mut epoch = shared.epoch.subscribe();
    epoch.mark_unchanged();
    let mut upstream =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(shared.upstream))
            .await
        {
            Ok(Ok(s)) => s,
            _ => {
                bump(&counters.upstream_failed);
                reset(client);
                return Ok(());
            }
        };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let strip = (shared.plan.lock().expect("fault plan lock").0)
        .strip_conditional
        .clone();
    if let Some(strip) = strip
        && !forward_stripped(&mut client, &mut upstream, &strip, counters).await?
    {
        return Ok(());
    }
    let ending = {
        let (both, up_only, down_only) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let both = Budget {
            moved: &both,
            limit: budget,
        };
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let up = copy_one_way(
            client_read,
            upstream_write,
            [
                both,
                Budget {
                    moved: &up_only,
                    limit: None,
                },
            ],
        );
        let down = copy_one_way(
            upstream_read,
            client_write,
            [
                both,
                Budget {
                    moved: &down_only,
                    limit: reply_budget,
                },
            ],
        );
        tokio::pin!(up, down);
        let expire = async {
            match lifetime {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expire);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let ended = tokio::select! {
                r = &mut up, if !up_done => {
                    up_done = true;
                    r.unwrap_or(Ending::Failed)
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    r.unwrap_or(Ending::Failed)
                }
                _ = &mut expire => Ending::Lifetime,
                _ = epoch.changed() => Ending::ResetOpen,
            };
            match ended {
                Ending::Done if up_done && down_done => break Ending::Done,
                Ending::Done => {}
                other => break other,
            }
        }
    };
    match (ending, fault) {
        (Ending::Done | Ending::Failed, fault) => {
            if fault.is_some() {
                bump(&counters.cut_missed);
            }
            return Ok(());
        }
        (Ending::Budget | Ending::Lifetime, Some(FaultKind::LostReply)) => {
            bump(&counters.lost_reply)
        }
        (Ending::Budget | Ending::Lifetime, Some(_)) => bump(&counters.cut),
        (Ending::Budget | Ending::Lifetime, None) => bump(&counters.expired),
        (Ending::ResetOpen, _) => bump(&counters.reset_open),
    }
    reset(client);
    reset(upstream);
    Ok(())
}

/// Reads the first request's head from `client`, removes its conditional headers (signing
/// it again when it had some), adds `Connection: close`, and sends it on with whatever
/// followed it. `false` when the client closed first, or sent no valid head (both sides
/// are then closed).
async fn forward_stripped(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    strip: &StripConditional,
    counters: &Counters,
) -> io::Result<bool> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return Ok(false);
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let (head, stripped) = strip_head(&head, strip.secret_key.as_deref())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if stripped {
        bump(&counters.stripped);
    }
    upstream.write_all(head.as_bytes()).await?;
    upstream.write_all(&buf[end..]).await?;
    Ok(true)
}

/// Conditional headers, removed by [`strip_head`].
const CONDITIONAL: [&str; 2] = ["if-none-match", "if-match"];

/// `head` (a request line and headers, ending with an empty line) without its conditional
/// headers and with `Connection: close`; signed again with `secret` when it had
/// conditional headers and a SigV4 `Authorization`. Says whether it removed any.
fn strip_head(head: &str, secret: Option<&str>) -> Result<(String, bool), String> {
    let mut lines = head.trim_end_matches("\r\n").split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("not a header line: {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    headers.retain(|(name, _)| {
        let name = name.to_ascii_lowercase();
        !CONDITIONAL.contains(&name.as_str()) && name != "connection"
    });
    let stripped = CONDITIONAL
        .iter()
        .any(|c| head.to_ascii_lowercase().contains(&format!("\r\n{c}:")));
    if stripped
        && let Some(secret) = secret
        && let Some(i) = headers
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case("authorization"))
    {
        headers[i].1 = sign_again(&request_line, &headers, &headers[i].1, secret)?;
    }
    let mut out = request_line;
    out.push_str("\r\n");
    for (name, value) in &headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok((out, stripped))
}

/// A SigV4 `Authorization` header for the request, with the credential scope of `old`
/// and its signed headers less the conditional ones (S3's rules: the path as sent,
/// the query sorted, the payload hash from `x-amz-content-sha256`).
fn sign_again(
    request_line: &str,
    headers: &[(String, String)],
    old: &str,
    secret: &str,
) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let field = |name: &str| {
        old.split([' ', ','])
            .find_map(|part| part.trim().strip_prefix(name))
            .ok_or_else(|| format!("no {name} in the Authorization header"))
    };
    let credential = field("Credential=")?;
    let signed: Vec<String> = field("SignedHeaders=")?
        .split(';')
        .filter(|h| !CONDITIONAL.contains(h))
        .map(str::to_owned)
        .collect();
    let (key_id, scope) = credential
        .split_once('/')
        .ok_or_else(|| format!("malformed credential {credential:?}"))?;
    let value_of = |name: &str| {
        let values: Vec<String> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        values.join(",")
    };
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.contains('=') {
                p.to_owned()
            } else {
                format!("{p}=")
            }
        })
        .collect();
    params.sort();
    let mut canonical = format!("{method}\n{path}\n{}\n", params.join("&"));
    for name in &signed {
        canonical.push_str(&format!("{name}:{}\n", value_of(name)));
    }
    canonical.push_str(&format!(
        "\n{}\n{}",
        signed.join(";"),
        value_of("x-amz-content-sha256")
    ));
    let amz_date = value_of("x-amz-date");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = format!("AWS4{secret}").into_bytes();
    for step in scope.split('/') {
        key = hmac_sha256(&key, step.as_bytes()).to_vec();
    }
    let signature = hex::encode(hmac_sha256(&key, to_sign.as_bytes()));
    Ok(format!(
        "AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={}, Signature={signature}",
        signed.join(";")
    ))
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The end of the request head in `buf`, if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// What the error answer needs to know about the request.
#[derive(Debug, Default)]
struct RequestHead {
    method: String,
    content_length: Option<u64>,
    expect_continue: bool,
    body_read: u64,
}

/// Reads the first request's head (at most 64 KiB); `None` if the client closed first.
async fn read_head(client: &mut TcpStream) -> io::Result<Option<RequestHead>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head over 64 KiB",
            ));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let mut head = RequestHead {
        method: lines
            .next()
            .and_then(|l| l.split(' ').next())
            .unwrap_or("")
            .to_owned(),
        body_read: (buf.len() - end) as u64,
        ..RequestHead::default()
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => head.content_length = value.parse().ok(),
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    Ok(Some(head))
}

/// Reads and drops up to `n` bytes, or until the client pauses for `idle`.
async fn drain(client: &mut TcpStream, mut n: u64, idle: Duration) {
    let mut chunk = [0u8; 16 * 1024];
    while n > 0 {
        match tokio::time::timeout(idle, client.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => n = n.saturating_sub(read as u64),
            _ => return,
        }
    }
}

/// Answers the first request with an S3 error and `Connection: close`.
async fn answer_error(mut client: TcpStream, kind: FaultKind, id: u64) -> io::Result<()> {
    let head = match tokio::time::timeout(Duration::from_secs(10), read_head(&mut client)).await {
        Ok(Ok(Some(h))) => h,
        _ => return Ok(()),
    };
    // Read the body, so that closing does not turn into a reset that could hide the answer
    // (with `Expect: 100-continue` the client waits for us instead of sending it).
    if !head.expect_continue {
        let rest = match head.content_length {
            Some(len) => len.saturating_sub(head.body_read),
            None => u64::MAX,
        };
        drain(&mut client, rest, Duration::from_millis(300)).await;
    }
    let (status, code, message) = match kind {
        FaultKind::SlowDown => (
            "503 Slow Down",
            "SlowDown",
            "Please reduce your request rate.",
        ),
        _ => (
            "500 Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let request_id = format!("FAULTPROXY{id:06}");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}\
         </Message><RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
    );
    let body = if head.method.eq_ignore_ascii_case("HEAD") {
        String::new()
    } else {
        body
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         x-amz-request-id: {request_id}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await?;
    // Lingering close: let the client read the answer and close its side first.
    drain(&mut client, u64::MAX, Duration::from_secs(1)).await;
    Ok(())
}

/// Reads and drops everything for `d`, answers nothing, then closes.
async fn stall(mut client: TcpStream, d: Duration) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + d;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
            Err(_) => break,            // the stall is over
            Ok(Ok(0)) => return Ok(()), // the client gave up
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny upstream that answers every request with `200 OK` and the body `ok` (256 KiB
    /// of `x` for `/big`), counting the requests it received.
    fn upstream() -> (SocketAddr, Arc<AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&requests);
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for stream in listener.incoming().take(64) {
                let Ok(mut s) = stream else { continue };
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        if let Some(end) = head_end(&buf) {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let close = head.contains("connection: close");
                            let body = if head.starts_with("get /big ") {
                                "x".repeat(256 * 1024)
                            } else {
                                "ok".to_owned()
                            };
                            buf.drain(..end);
                            counter.fetch_add(1, Ordering::SeqCst);
                            let response = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(response.as_bytes()).is_err() || close {
                                return;
                            }
                            continue;
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, requests)
    }

    /// Sends one GET and returns what came back (or the error).
    fn get(addr: SocketAddr) -> io::Result<String> {
        get_path(addr, "/x")
    }

    fn get_path(addr: SocketAddr, path: &str) -> io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The signature of AWS's documented example (S3, "GET Object"), from the request
    /// alone; then the same request with an `If-None-Match` header is stripped of it and
    /// signed again exactly as if it had never had it.
    #[test]
    fn requests_are_signed_again_without_their_conditional_headers() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let auth = |signed: &str, signature: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
                 SignedHeaders={signed}, Signature={signature}"
            )
        };
        let expected = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41";
        let head = |extra: &str, authorization: &str| {
            format!(
                "GET /test.txt HTTP/1.1\r\nHost: examplebucket.s3.amazonaws.com\r\n\
                 Range: bytes=0-9\r\n{extra}x-amz-content-sha256: \
                 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\r\n\
                 x-amz-date: 20130524T000000Z\r\nAuthorization: {authorization}\r\n\r\n"
            )
        };
        let plain = head(
            "",
            &auth("host;range;x-amz-content-sha256;x-amz-date", expected),
        );
        let request_line = "GET /test.txt HTTP/1.1";
        let headers: Vec<(String, String)> = plain
            .trim_end()
            .split("\r\n")
            .skip(1)
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let old = &headers.last().unwrap().1;
        assert_eq!(
            sign_again(request_line, &headers, old, secret).unwrap(),
            auth("host;range;x-amz-content-sha256;x-amz-date", expected)
        );

        let conditional = head(
            "If-None-Match: *\r\n",
            &auth(
                "host;if-none-match;range;x-amz-content-sha256;x-amz-date",
                "0000",
            ),
        );
        let (out, stripped) = strip_head(&conditional, Some(secret)).unwrap();
        assert!(stripped);
        assert!(!out.to_ascii_lowercase().contains("if-none-match"), "{out}");
        assert!(out.contains(&auth(
            "host;range;x-amz-content-sha256;x-amz-date",
            expected
        )));
        assert!(out.ends_with("Connection: close\r\n\r\n"), "{out}");
        // Without conditional headers nothing is signed again.
        let (out, stripped) = strip_head(&plain, Some(secret)).unwrap();
        assert!(!stripped);
        assert!(out.contains(expected));
    }

    fn only(kind: FaultKind) -> FaultPlan {
        FaultPlan {
            rate: 1.0,
            kinds: vec![(kind, 1)],
            stall: Duration::from_millis(300),
            ..FaultPlan::none()
        }
    }

    #[test]
    fn each_fault_does_what_it_says_and_is_counted() {
        let (up, requests) = upstream();
        let proxy = FaultProxy::start(&format!("http://{up}"), FaultPlan::none(), 1).unwrap();
        assert!(proxy.addr().ip().is_loopback());
        let ok = get(proxy.addr()).unwrap();
        assert!(
            ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("ok"),
            "{ok}"
        );

        proxy.set_plan(only(FaultKind::SlowDown)).unwrap();
        let r = get(proxy.addr()).unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("<Code>SlowDown</Code>") && r.contains("Connection: close"));

        proxy.set_plan(only(FaultKind::InternalError)).unwrap();
        let r = get(proxy.addr()).unwrap();
        assert!(r.starts_with("HTTP/1.1 500") && r.contains("<Code>InternalError</Code>"));

        proxy.set_plan(only(FaultKind::Reset)).unwrap();
        match get(proxy.addr()) {
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ),
                "{e}"
            ),
            Ok(r) => assert!(r.is_empty(), "a reset connection answered {r:?}"),
        }

        proxy.set_plan(only(FaultKind::Stall)).unwrap();
        let started = std::time::Instant::now();
        let r = get(proxy.addr()).unwrap_or_default();
        assert!(r.is_empty(), "a stalled connection answered {r:?}");
        assert!(started.elapsed() >= Duration::from_millis(250));

        // A cut after 2000 bytes: the big answer stops short, with a reset.
        proxy
            .set_plan(FaultPlan {
                cut_bytes: (2000, 2000),
                cut_after: (Duration::from_secs(30), Duration::from_secs(30)),
                ..only(FaultKind::Cut)
            })
            .unwrap();
        let full = 256 * 1024;
        match get_path(proxy.addr(), "/big") {
            Ok(r) => assert!(
                r.len() < full,
                "a cut connection delivered {} bytes",
                r.len()
            ),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        // A small exchange ends before its cut: nothing happens.
        let r = get(proxy.addr()).unwrap();
        assert!(r.ends_with("ok"), "{r}");

        // A lost reply: the request got there, at most 10 bytes of the answer come back.
        proxy
            .set_plan(FaultPlan {
                reply_bytes: 10,
                ..only(FaultKind::LostReply)
            })
            .unwrap();
        let before = requests.load(Ordering::SeqCst);
        match get(proxy.addr()) {
            Ok(r) => assert!(r.len() <= 10, "a lost reply delivered {r:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert_eq!(requests.load(Ordering::SeqCst), before + 1);

        proxy.set_plan(FaultPlan::none()).unwrap();
        let r = get_path(proxy.addr(), "/big").unwrap();
        assert!(r.len() > full, "{}", r.len());

        let c = proxy.counts();
        let got = [
            c.connections,
            c.passed,
            c.reset,
            c.slow_down,
            c.internal_error,
            c.stalled,
            c.cut,
            c.cut_missed,
            c.lost_reply,
        ];
        assert_eq!(got, [9, 2, 1, 1, 1, 1, 1, 1, 1], "{c}");
    }

    #[test]
    fn open_connections_are_reset_on_request_and_at_their_lifetime() {
        use std::io::{Read, Write};
        let (up, _) = upstream();
        let proxy = FaultProxy::start(&up.to_string(), FaultPlan::none(), 2).unwrap();
        let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        proxy.reset_open();
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            r.is_err() || rest.is_empty(),
            "the connection stayed open: {r:?}"
        );
        assert_eq!(proxy.counts().reset_open, 1);

        proxy
            .set_plan(FaultPlan {
                max_lifetime: Some(Duration::from_millis(200)),
                ..FaultPlan::none()
            })
            .unwrap();
        let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(proxy.counts().expired, 1);
    }

    #[test]
    fn faults_come_at_the_planned_rate_from_the_seed() {
        let draw = |seed| {
            let shared = Shared {
                upstream: "127.0.0.1:1".parse().unwrap(),
                plan: Mutex::new((
                    FaultPlan::mixed(0.3, Duration::ZERO),
                    StdRng::seed_from_u64(seed),
                )),
                counters: Counters::default(),
                epoch: watch::channel(0).0,
                next_request_id: AtomicU64::new(1),
            };
            (0..2000)
                .map(|_| !matches!(shared.decide(), Decision::Pass { fault: None, .. }))
                .collect::<Vec<bool>>()
        };
        let a = draw(5);
        assert_eq!(a, draw(5), "the same seed must give the same faults");
        let faults = a.iter().filter(|f| **f).count();
        assert!(
            (500..700).contains(&faults),
            "{faults} faults of 2000 at rate 0.3"
        );
    }

    #[test]
    fn refuses_what_is_not_loopback_and_bad_plans() {
        assert!(parse_upstream("http://192.0.2.1:9000").is_err());
        assert!(parse_upstream("https://127.0.0.1:9000").is_err());
        assert_eq!(
            parse_upstream("http://127.0.0.1:9000/").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        assert!(
            FaultProxy::start_on(
                "0.0.0.0:0".parse().unwrap(),
                "127.0.0.1:1",
                FaultPlan::none(),
                0
            )
            .is_err()
        );
        let mut bad = FaultPlan::none();
        bad.rate = 0.5;
        assert!(bad.validate().is_err());
        assert!(FaultKind::parse("stall").is_ok() && FaultKind::parse("nap").is_err());
    }
}
