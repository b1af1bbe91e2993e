//! Progress for people: indicatif bars on a terminal, plain log lines otherwise.
//!
//! A command asks [`Progress`] for one [`PhaseBar`] per phase (downloading the base,
//! downloading and replaying the WAL, verifying). On a terminal each phase is a bar; when
//! standard error is not a terminal (a pipe, a log collector) each phase logs a line when it
//! starts, at most every [`LOG_INTERVAL`] while it runs, and when it ends.
//!
//! Logs and bars share standard error: [`Progress::log_writer`] gives a `tracing` writer that
//! suspends the bars while a log line is printed, so neither tears the other.

use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::human_bytes;

/// How often a phase logs its progress when there are no bars.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum Mode {
    Bars(MultiProgress),
    Log,
    Hidden,
}

/// Where progress goes for one command.
#[derive(Debug, Clone)]
pub struct Progress {
    mode: Mode,
}

/// What a phase counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Records,
    Objects,
    Keys,
}

impl Progress {
    /// Bars if standard error is a terminal, log lines otherwise.
    pub fn auto() -> Progress {
        if io::stderr().is_terminal() {
            Progress::bars()
        } else {
            Progress::log_lines()
        }
    }

    /// Bars on standard error.
    pub fn bars() -> Progress {
        Progress {
            mode: Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// Log lines through `tracing`.
    pub fn log_lines() -> Progress {
        Progress { mode: Mode::Log }
    }

    /// Nothing at all (tests, `--quiet`).
    pub fn hidden() -> Progress {
        Progress { mode: Mode::Hidden }
    }

    /// A new phase counting `unit`s up to `total` (0 if unknown).
    pub fn phase(&self, name: &str, total: u64, unit: Unit) -> PhaseBar {
        let bar = match &self.mode {
            Mode::Bars(multi) => {
                let bar = multi.add(ProgressBar::new(total));
                let counter = match unit {
                    Unit::Bytes => "{bytes}/{total_bytes} {bytes_per_sec}",
                    Unit::Records => "{human_pos}/{human_len} records",
                    Unit::Objects => "{human_pos}/{human_len} objects",
                    Unit::Keys => "{human_pos} keys",
                };
                let template = format!(
                    "{{prefix:>14.bold}} [{{bar:32}}] {counter} {{msg}} ({{elapsed}}, eta {{eta}})"
                );
                bar.set_style(
                    ProgressStyle::with_template(&template)
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix(name.to_owned());
                bar.enable_steady_tick(Duration::from_millis(250));
                Some(bar)
            }
            Mode::Log => {
                tracing::info!(
                    "{name}: starting ({})",
                    if total > 0 {
                        show(unit, total)
                    } else {
                        "size unknown".to_owned()
                    }
                );
                None
            }
            Mode::Hidden => None,
        };
        PhaseBar(Arc::new(PhaseInner {
            name: name.to_owned(),
            unit,
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
            bar,
            log: matches!(self.mode, Mode::Log),
        }))
    }

    /// A `tracing` writer for standard error that does not tear the bars.
    pub fn log_writer(&self) -> LogWriter {
        LogWriter {
            multi: match &self.mode {
                Mode::Bars(m) => Some(m.clone()),
                _ => None,
            },
        }
    }

    /// Prints a line to standard error above the bars.
    pub fn println(&self, line: &str) {
        match &self.mode {
            Mode::Bars(m) => {
                let _ = m.println(line);
            }
            _ => eprintln!("{line}"),
        }
    }
}

fn show(unit: Unit, n: u64) -> String {
    match unit {
        Unit::Bytes => human_bytes(n),
        Unit::Records => format!("{n} records"),
        Unit::Objects => format!("{n} objects"),
        Unit::Keys => format!("{n} keys"),
    }
}

#[derive(Debug)]
struct PhaseInner {
    name: String,
    unit: Unit,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    last_log: Mutex<Instant>,
    bar: Option<ProgressBar>,
    log: bool,
}

/// The progress of one phase; cheap to clone and share between tasks.
#[derive(Debug, Clone)]
pub struct PhaseBar(Arc<PhaseInner>);

impl PhaseBar {
    /// A phase that shows nothing.
    pub fn hidden() -> PhaseBar {
        Progress::hidden().phase("", 0, Unit::Objects)
    }

    /// Counts `n` more units.
    pub fn inc(&self, n: u64) {
        let p = &self.0;
        let done = p.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &p.bar {
            bar.inc(n);
        } else if p.log {
            let mut last = p.last_log.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= LOG_INTERVAL {
                *last = Instant::now();
                let total = p.total.load(Ordering::Relaxed);
                if total > 0 {
                    tracing::info!(
                        "{}: {} of {} ({:.0}%)",
                        p.name,
                        show(p.unit, done),
                        show(p.unit, total),
                        done as f64 * 100.0 / total as f64
                    );
                } else {
                    tracing::info!("{}: {}", p.name, show(p.unit, done));
                }
            }
        }
    }

    /// Changes the total (when it turns out smaller or larger than planned).
    pub fn set_total(&self, total: u64) {
        self.0.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.0.bar {
            bar.set_length(total);
        }
    }

    /// A short note shown after the bar.
    pub fn set_message(&self, msg: impl Into<String>) {
        if let Some(bar) = &self.0.bar {
            bar.set_message(msg.into());
        }
    }

    /// Units counted so far.
    pub fn done(&self) -> u64 {
        self.0.done.load(Ordering::Relaxed)
    }

    /// Ends the phase with a closing note.
    pub fn finish(&self, msg: impl Into<String>) {
        let msg = msg.into();
        let p = &self.0;
        if let Some(bar) = &p.bar {
            bar.finish_with_message(msg);
        } else if p.log {
            tracing::info!(
                "{}: done, {} in {}{}",
                p.name,
                show(p.unit, p.done.load(Ordering::Relaxed)),
                crate::human_duration(p.started.elapsed()),
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(", {msg}")
                }
            );
        }
    }

    /// Ends the phase after a failure (the bar disappears).
    pub fn abandon(&self) {
        if let Some(bar) = &self.0.bar {
            bar.abandon();
        }
    }
}

/// A `tracing` writer: standard error, with the bars suspended during each write.
#[derive(Debug, Clone)]
pub struct LogWriter {
    multi: Option<MultiProgress>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.multi {
            Some(m) => m.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_count_whatever_the_mode() {
        for p in [Progress::hidden(), Progress::log_lines()] {
            let bar = p.phase("fetch", 100, Unit::Bytes);
            bar.inc(30);
            bar.clone().inc(12);
            assert_eq!(bar.done(), 42);
            bar.set_total(50);
            bar.finish("ok");
        }
    }
}
