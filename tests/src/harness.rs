//! Running the real programs as separate processes, against a local-directory store or the
//! S3 server the test script started: what end-to-end tests share.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;
use tidemark_manifest::repo::Repository;
use tidemark_manifest::store::{
    EncryptionKey, LocalStore, ObjectStore, OpenOptions, S3Options, StoreUrl,
};
use tidemark_manifest::testing::s3 as test_s3;

/// A workspace binary, built by `cargo build --workspace` (scripts/test.sh does).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test executable location")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace` (scripts/test.sh does) before these tests",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `program` to completion, at most `limit` (then it is killed and this fails with its
/// output): exit code, stdout, stderr.
pub fn run_with_timeout(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    limit: Duration,
) -> Result<(i32, String, String)> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} {} did not finish within {limit:?}; its output:\n{}\n{}",
                program.display(),
                args.join(" "),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&out_path)?,
        std::fs::read_to_string(&err_path)?,
    ))
}

/// A finished program's exit code and output, for failure messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child process that is killed when dropped; its output goes to a log file.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args` and extra environment (`TIDEMARK_LOG` in it replaces
    /// the default filter), logging to `log`.
    pub fn spawn(
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Proc> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .env("TIDEMARK_LOG", "info,tidemark_archiver=debug,aws=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc {
            name: program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Sends a signal (e.g. `"TERM"`, `"KILL"`, `"USR1"`).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {} failed", self.child.id());
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit, at most `limit`; fails with its log unless it
    /// exited 0.
    pub fn wait_success(&mut self, limit: Duration) -> Result<()> {
        let status = self.wait_timeout(limit)?;
        ensure!(
            status.success(),
            "{} exited with {status}; its log:\n{}",
            self.name,
            self.log_tail()
        );
        Ok(())
    }

    /// Stops the process with SIGTERM; it must exit 0 within `limit`.
    pub fn stop(&mut self, limit: Duration) -> Result<()> {
        self.signal("TERM")?;
        self.wait_success(limit)
    }

    /// Kills the process with SIGKILL and waits for it; it must have been running until then
    /// (else this fails with its log).
    pub fn kill_running(&mut self) -> Result<()> {
        ensure!(
            self.running(),
            "{} exited before it was killed; its log:\n{}",
            self.name,
            self.log_tail()
        );
        self.signal("KILL")?;
        self.wait_timeout(Duration::from_secs(10))?;
        Ok(())
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where a test's repository lives.
#[derive(Debug)]
pub struct TestStore {
    /// `file:///…` or `s3://bucket/prefix`.
    pub url: String,
    /// Environment the programs need to reach it.
    pub env: Vec<(String, String)>,
    /// S3 options for opening it in-process.
    pub s3: S3Options,
    /// A human description for logs.
    pub describe: String,
    /// The client-side encryption key, for a store made with [`TestStore::encrypted`].
    pub key: Option<EncryptionKey>,
    _dir: Option<TempDir>,
}

impl TestStore {
    /// A fresh local-directory repository.
    pub fn local() -> Result<TestStore> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("repo");
        Ok(TestStore {
            url: format!("file://{}", root.display()),
            env: Vec::new(),
            s3: S3Options::default(),
            describe: format!("local directory {}", root.display()),
            key: None,
            _dir: Some(dir),
        })
    }

    /// A fresh prefix in the test S3 server's bucket, or `None` (with a loud message) when
    /// no server was started. Fails when `TIDEMARK_REQUIRE_S3=1` and there is none.
    pub async fn s3(test: &str) -> Result<Option<TestStore>> {
        let Some(endpoint) = test_s3::endpoint(test) else {
            return Ok(None);
        };
        let bucket = test_s3::bucket(&endpoint).await?;
        let prefix = test_s3::prefix(test);
        eprintln!("{test}: S3 server at {endpoint}, bucket {bucket}, prefix {prefix}");
        Ok(Some(TestStore {
            url: format!("s3://{bucket}/{prefix}"),
            env: vec![
                ("TIDEMARK_ENDPOINT_URL".into(), endpoint.clone()),
                ("TIDEMARK_PATH_STYLE".into(), "true".into()),
            ],
            s3: S3Options {
                endpoint_url: Some(endpoint.clone()),
                force_path_style: true,
                ..S3Options::default()
            },
            describe: format!("S3 server {endpoint}"),
            key: None,
            _dir: None,
        }))
    }

    /// Like [`TestStore::s3`], in a bucket with S3 Object Lock enabled.
    pub async fn s3_locked(test: &str) -> Result<Option<TestStore>> {
        let Some(endpoint) = test_s3::endpoint(test) else {
            return Ok(None);
        };
        let bucket = test_s3::lock_bucket(&endpoint).await?;
        let Some(mut store) = TestStore::s3(test).await? else {
            return Ok(None);
        };
        let prefix = store
            .url
            .split_once("//")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, prefix)| prefix.to_owned())
            .unwrap_or_default();
        store.url = format!("s3://{bucket}/{prefix}");
        eprintln!("{test}: in the Object Lock bucket {bucket}");
        Ok(Some(store))
    }

    /// The same S3 repository reached through another endpoint, such as a
    /// [`FaultProxy`](crate::faultproxy::FaultProxy) in front of the server: for the programs
    /// (`TIDEMARK_ENDPOINT_URL`) and for [`TestStore::open`].
    pub fn through(&self, endpoint: &str) -> Result<TestStore> {
        if self.local_root().is_some() {
            bail!(
                "{} is a local directory, not reached through an endpoint",
                self.describe
            );
        }
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| k != "TIDEMARK_ENDPOINT_URL")
            .cloned()
            .collect();
        env.push(("TIDEMARK_ENDPOINT_URL".into(), endpoint.to_owned()));
        Ok(TestStore {
            url: self.url.clone(),
            env,
            s3: S3Options {
                endpoint_url: Some(endpoint.to_owned()),
                ..self.s3.clone()
            },
            describe: format!("{} through {endpoint}", self.describe),
            key: self.key.clone(),
            _dir: None,
        })
    }

    /// The same store, with a new client-side encryption key that the programs get in
    /// `TIDEMARK_ENCRYPTION_KEY` and [`TestStore::open`] uses.
    pub fn encrypted(mut self) -> TestStore {
        let key = EncryptionKey::generate();
        self.env
            .push(("TIDEMARK_ENCRYPTION_KEY".into(), key.to_hex().to_string()));
        self.describe = format!("{} (encrypted, key id {})", self.describe, key.key_id());
        self.key = Some(key);
        self
    }

    /// The local directory of a `file://` store.
    pub fn local_root(&self) -> Option<PathBuf> {
        self.url.strip_prefix("file://").map(PathBuf::from)
    }

    /// Opens the repository in-process once it exists (the archiver creates a local
    /// directory on its first start).
    pub async fn open_when_created(&self) -> Result<Repository> {
        if let Some(root) = self.local_root() {
            wait_for(Duration::from_secs(20), "the repository directory", || {
                root.exists().then_some(())
            })?;
        }
        self.open().await
    }

    /// Opens the repository in-process (with the store's encryption key, if it has one).
    pub async fn open(&self) -> Result<Repository> {
        Ok(Repository::open(self.open_raw().await?, self.key.as_ref()).await?)
    }

    /// The store itself, as the bytes lie in it (no decryption).
    pub async fn open_raw(&self) -> Result<Arc<dyn ObjectStore>> {
        let url = StoreUrl::parse(&self.url)?;
        Ok(match &url {
            StoreUrl::Local { root } => Arc::new(LocalStore::open(root)?),
            _ => {
                tidemark_manifest::store::open_store_with(
                    &url,
                    &OpenOptions {
                        s3: self.s3.clone(),
                        ..OpenOptions::default()
                    },
                )
                .await?
            }
        })
    }
}

/// Runs `test` on a fresh prefix of the test S3 server ([`TestStore::s3`] names it after
/// `name`). Without a server it passes after saying so loudly, unless
/// `TIDEMARK_REQUIRE_S3=1`.
pub async fn with_s3<F, Fut>(name: &str, test: F) -> Result<()>
where
    F: FnOnce(TestStore) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    match TestStore::s3(name).await? {
        Some(store) => test(store).await,
        None => Ok(()),
    }
}

/// A plain S3 client for the test server at `endpoint` (path-style, the region from
/// `AWS_REGION` or `us-east-1`, credentials from the environment): for tests that act on the
/// store as another program would, beside Tidemark's own store.
pub async fn raw_s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    )
}

/// Waits until `store` holds `last_seq` (its newest segment ends there) and a base backup,
/// while `archiver` keeps running; at most `limit`.
pub async fn wait_archived(
    store: &TestStore,
    last_seq: u64,
    archiver: &mut Proc,
    limit: Duration,
) -> Result<()> {
    let repo = store
        .open_when_created()
        .await
        .with_context(|| archiver.log_tail())?;
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(state) = repo.load().await
            && state.history.segments.last().map(|s| s.last_seq) == Some(last_seq)
            && !state.history.bases.is_empty()
        {
            return Ok(());
        }
        ensure!(
            archiver.running(),
            "the archiver exited early; its log:\n{}",
            archiver.log_tail()
        );
        ensure!(
            Instant::now() < deadline,
            "{} did not reach sequence {last_seq} within {limit:?}; archiver log:\n{}",
            store.describe,
            archiver.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTP GET to a metrics server: (status, head, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    // Only a guard against a server that never answers.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {out:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, head.to_owned(), body.to_owned()))
}

/// The address an archiver logged as "metrics listening on ADDR" in `log`.
pub fn logged_metrics_addr(log: &Path) -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    let at = text.find("metrics listening on ")? + "metrics listening on ".len();
    let addr: String = text[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    addr.parse().ok()
}

/// The value of one series (`name` or `name{labels}`) in a `/metrics` body, if present.
pub fn metric_sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `f` until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a database the load generator is creating can be archived: `CURRENT` and an
/// `OPTIONS-*` file exist (RocksDB writes OPTIONS after CURRENT; the archiver refuses a
/// database without one). RocksDB writes it as `OPTIONS-N.dbtmp` and renames it: only the
/// renamed file counts, as for the archiver.
pub fn wait_for_database(db: &Path) -> Result<()> {
    use tidemark_manifest::rocks::DbFile;
    wait_for(
        Duration::from_secs(60),
        "the load generator's database",
        || {
            let has_options = std::fs::read_dir(db).ok()?.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(DbFile::parse)
                    .is_some_and(|f| matches!(f, DbFile::Options(_)))
            });
            (db.join("CURRENT").exists() && has_options).then_some(())
        },
    )
}

/// Checks the final repository: loads without problems (contiguous segments, no overlap,
/// no duplicate), several bases, and the latest point is the writer's last sequence.
pub async fn check_history(
    store: &TestStore,
    oracle: &crate::Oracle,
    min_bases: usize,
) -> Result<()> {
    let repo = store.open().await?;
    let state = repo
        .load()
        .await
        .context("the repository must load without problems")?;
    let h = &state.history;
    ensure!(h.gaps.is_empty(), "unexpected gaps: {:?}", h.gaps);
    ensure!(
        h.bases.len() >= min_bases,
        "expected at least {min_bases} bases, found {}",
        h.bases.len()
    );
    for w in h.segments.windows(2) {
        ensure!(
            w[1].first_seq == w[0].last_seq + 1,
            "segments {} and {} are not contiguous",
            w[0].key,
            w[1].key
        );
    }
    let first_base = h.bases.iter().min_by_key(|b| b.earliest_seq).unwrap();
    let first_seg = h.segments.first().context("no segments")?;
    ensure!(
        first_seg.first_seq <= first_base.replay_from_seq,
        "the history starts at {} but the first base needs records from {}",
        first_seg.first_seq,
        first_base.replay_from_seq
    );
    let plan = h.plan(tidemark_manifest::plan::Target::Latest)?;
    ensure!(
        plan.max_seq == oracle.last_seq(),
        "latest restorable point {} != the writer's last sequence {}",
        plan.max_seq,
        oracle.last_seq()
    );
    // Every segment verifies (sha256 or trailer, every frame).
    let scratch = tempfile::tempdir()?;
    for s in &h.segments {
        let path = repo.fetch_segment(s, scratch.path()).await?;
        std::fs::remove_file(path)?;
    }
    eprintln!(
        "history: {} segments, {} bases, sequences {}..={}",
        h.segments.len(),
        h.bases.len(),
        first_seg.first_seq,
        plan.max_seq
    );
    Ok(())
}
