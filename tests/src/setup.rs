//! The scratch space of an end-to-end test and the programs run in it: a directory for the
//! database (`db`), the load generator's oracle (`oracle`) and the logs, a store, and
//! `tidemark-loadgen`, `tidemark-archiver` and the other programs started against them with
//! the options a test varies, set when the setup is made:
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use tidemark_tests::harness::TestStore;
//! use tidemark_tests::setup::Setup;
//! let s = Setup::new(TestStore::local()?)?.base_interval("1s");
//! let oracle = s.archive(&["--duration", "3", "--rate", "300"], &[]).await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::Oracle;
use crate::harness::{Proc, TestStore, bin, run_with_timeout, wait_archived, wait_for_database};

/// What the programs log when a test does not say otherwise.
const RUN_LOG_FILTER: &str = "info,aws=warn";

/// A test's directory and store, and how it runs the programs. See the module.
#[derive(Debug)]
pub struct Setup {
    dir: TempDir,
    /// The repository, as the test itself reaches it.
    pub store: TestStore,
    /// How the programs reach it, when not as the test does (through a proxy).
    programs: Option<TestStore>,
    sync_interval: String,
    checkpoint_interval: String,
    base_interval: Option<String>,
    log_filter: Option<String>,
}

impl Setup {
    /// A fresh directory beside `store`; the archiver closes segments every 200 ms, writes
    /// a generation every second and takes bases at its default interval.
    pub fn new(store: TestStore) -> Result<Setup> {
        Ok(Setup {
            dir: tempfile::tempdir()?,
            store,
            programs: None,
            sync_interval: "200ms".into(),
            checkpoint_interval: "1s".into(),
            base_interval: None,
            log_filter: None,
        })
    }

    /// The archiver's `--sync-interval`.
    pub fn sync_interval(mut self, interval: &str) -> Setup {
        self.sync_interval = interval.into();
        self
    }

    /// The archiver's `--checkpoint-interval`.
    pub fn checkpoint_interval(mut self, interval: &str) -> Setup {
        self.checkpoint_interval = interval.into();
        self
    }

    /// The archiver's `--base-interval`.
    pub fn base_interval(mut self, interval: &str) -> Setup {
        self.base_interval = Some(interval.into());
        self
    }

    /// `TIDEMARK_LOG` for the archiver (default: info, the archiver's own lines at debug).
    pub fn log_filter(mut self, filter: &str) -> Setup {
        self.log_filter = Some(filter.into());
        self
    }

    /// The programs reach the S3 store through `endpoint` (such as a fault proxy in front of
    /// the server); the test's own checks still reach it directly.
    pub fn through(mut self, endpoint: &str) -> Result<Setup> {
        self.programs = Some(self.store.through(endpoint)?);
        Ok(self)
    }

    /// The store as the programs reach it.
    pub fn programs_store(&self) -> &TestStore {
        self.programs.as_ref().unwrap_or(&self.store)
    }

    /// `name` in the test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The database the load generator writes.
    pub fn db(&self) -> PathBuf {
        self.path("db")
    }

    /// The load generator's oracle.
    pub fn oracle_dir(&self) -> PathBuf {
        self.path("oracle")
    }

    /// Opens the oracle of what the load generator wrote.
    pub fn oracle(&self) -> Result<Oracle> {
        Oracle::open(&self.oracle_dir())
    }

    /// Starts `tidemark-loadgen` on the database with `args` (logging to `loadgen.log`).
    pub fn loadgen(&self, args: &[impl AsRef<str>]) -> Result<Proc> {
        let mut a = vec![
            "--db".to_owned(),
            self.db().display().to_string(),
            "--out".to_owned(),
            self.oracle_dir().display().to_string(),
        ];
        a.extend(args.iter().map(|s| s.as_ref().to_owned()));
        Proc::spawn(
            &bin("tidemark-loadgen")?,
            &a,
            &[],
            &self.path("loadgen.log"),
        )
    }

    /// Starts `tidemark-archiver run` on the database with the setup's intervals and
    /// `extra` arguments, logging to `log`.
    pub fn archiver(&self, log: &str, extra: &[&str]) -> Result<Proc> {
        self.archiver_with_env(log, extra, &[])
    }

    /// [`Setup::archiver`] with `env` added to the store's environment.
    pub fn archiver_with_env(
        &self,
        log: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Proc> {
        let store = self.programs_store();
        let mut a: Vec<String> = [
            "run",
            "--db",
            &self.db().display().to_string(),
            "--to",
            &store.url,
            "--sync-interval",
            &self.sync_interval,
            "--checkpoint-interval",
            &self.checkpoint_interval,
        ]
        .map(String::from)
        .to_vec();
        if let Some(base) = &self.base_interval {
            a.extend(["--base-interval".to_owned(), base.clone()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        let mut all_env = store.env.clone();
        all_env.extend_from_slice(env);
        if let Some(filter) = &self.log_filter {
            all_env.push(("TIDEMARK_LOG".into(), filter.clone()));
        }
        Proc::spawn(&bin("tidemark-archiver")?, &a, &all_env, &self.path(log))
    }

    /// Runs a program of the workspace against the store (its environment, info logs) to
    /// completion: exit code, stdout, stderr (also printed, for failures).
    pub fn run(&self, program: &str, args: &[&str]) -> Result<(i32, String, String)> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.run_path(program, &bin(program)?, &args)
    }

    /// [`Setup::run`] with the program's address space limited to `mib` MiB (`ulimit -v`),
    /// so a program that would read something huge into memory fails at once instead of
    /// taking the machine's memory.
    pub fn run_within_memory(
        &self,
        mib: u64,
        program: &str,
        args: &[&str],
    ) -> Result<(i32, String, String)> {
        let script = format!("ulimit -v {}; exec \"$0\" \"$@\"", mib * 1024);
        let mut a = vec!["-c".to_owned(), script, bin(program)?.display().to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        self.run_path(program, Path::new("/bin/sh"), &a)
    }

    fn run_path(
        &self,
        program: &str,
        path: &Path,
        args: &[String],
    ) -> Result<(i32, String, String)> {
        let mut env = self.programs_store().env.clone();
        env.push(("TIDEMARK_LOG".into(), RUN_LOG_FILTER.into()));
        env.push(("RUST_LOG".into(), "warn".into()));
        let (code, out, err) = run_with_timeout(path, args, &env, Duration::from_secs(180))?;
        eprintln!("$ {program} {}\n-> {code}\n{out}\n{err}", args.join(" "));
        Ok((code, out, err))
    }

    /// Runs `tidemark-archiver prune --to URL ARGS`: exit code, stdout, stderr.
    pub fn prune(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let url = self.programs_store().url.clone();
        let mut a = vec!["prune", "--to", &url];
        a.extend_from_slice(args);
        self.run("tidemark-archiver", &a)
    }

    /// Writes with `tidemark-loadgen ARGS` while an archiver (with `archiver_extra`) runs
    /// beside it; once the writer is done and the repository holds its last sequence and a
    /// base, stops the archiver with SIGTERM (it must exit 0). Returns the oracle.
    pub async fn archive(&self, loadgen_args: &[&str], archiver_extra: &[&str]) -> Result<Oracle> {
        let mut writer = self.loadgen(loadgen_args)?;
        wait_for_database(&self.db())?;
        let mut arch = self.archiver("archiver.log", archiver_extra)?;
        writer.wait_success(Duration::from_secs(90))?;
        let oracle = self.oracle()?;
        wait_archived(
            &self.store,
            oracle.last_seq(),
            &mut arch,
            Duration::from_secs(60),
        )
        .await?;
        arch.stop(Duration::from_secs(30))?;
        Ok(oracle)
    }

    /// The last archived sequence, as a reader finds it (`None` before there is a
    /// repository or a segment).
    pub async fn archived_seq(&self) -> Option<u64> {
        let repo = self.store.open().await.ok()?;
        let state = repo.load().await.ok()?;
        state.history.segments.last().map(|s| s.last_seq)
    }

    /// The store's local directory (for a `file://` store).
    pub fn local_root(&self) -> Result<PathBuf> {
        self.store
            .local_root()
            .with_context(|| format!("{} is not a local directory", self.store.describe))
    }
}
