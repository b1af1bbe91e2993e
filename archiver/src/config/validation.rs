//! The limits of the archiver's settings, checked once when they are loaded (config file,
//! flags and environment merged), so that a value that cannot work stops the start with a
//! message naming its key instead of failing, or panicking, hours later: each database's
//! ([`check_settings`]), and those between the databases of a `[[databases]]` file
//! ([`FleetConfig::validate`]).
//!
//! Every duration is at most [`retention::MAX_DURATION`] (100 years); intervals are longer
//! than zero; the lease lasts at least [`MIN_LEASE_TTL`]. The retention policy's own rules
//! (FORMAT.md §4.6) are [`retention::Rules::validate`]'s.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use tidemark_manifest::model::ObjectLock;
use tidemark_manifest::retention::{self, Rules};
use tidemark_manifest::store::StoreUrl;

use super::file::{FileError, FleetConfig, invalid};
use super::{ArchiverOptions, ConfigError, PruneOptions, ReplayBound};
use crate::prune::PruneError;

/// The shortest lease: it is renewed a third of the way through its time, and retried every
/// 2 s while the store fails, so a shorter one expires on a single slow store call.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(10);

/// The bounds of `max_segment_bytes`: below, every few records make an object; above, the
/// three segments held at once (FORMAT.md §4.5 uploads them one at a time) would take
/// gigabytes of memory.
pub const SEGMENT_BYTES: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = \"{value}\" {problem}")]
pub struct InvalidSetting {
    /// The key as written in the config file (`retention.grace`).
    pub key: String,
    /// The value, as a duration.
    pub value: String,
    /// What is wrong and what to give instead.
    pub problem: String,
}

/// What a duration may be.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// Zero allowed (e.g. a grace period: delete at once).
    ZeroOk,
    /// Longer than zero.
    Positive,
    /// At least this long.
    AtLeast(Duration),
}

fn check(key: &str, value: Duration, bound: Bound) -> Result<(), InvalidSetting> {
    let invalid = |problem: String| InvalidSetting {
        key: key.to_owned(),
        value: humantime::format_duration(value).to_string(),
        problem,
    };
    let max = retention::MAX_DURATION.unsigned_abs();
    if value > max {
        return Err(invalid(
            "is longer than 100 years, the most any duration may be (times that far off \
             cannot be represented); give the span you mean, e.g. 30d"
                .to_owned(),
        ));
    }
    match bound {
        Bound::ZeroOk => Ok(()),
        Bound::Positive if value.is_zero() => Err(invalid(
            "must be longer than zero; give a duration such as 1s, 15m or 24h".to_owned(),
        )),
        Bound::Positive => Ok(()),
        Bound::AtLeast(min) if value < min => Err(invalid(format!(
            "is shorter than {}, the shortest that works: {}",
            humantime::format_duration(min),
            "the lease is renewed a third of the way through its time and retried every 2s \
             while the store fails, so a shorter one expires on a single slow store call \
             (the default is 60s)"
        ))),
        Bound::AtLeast(_) => Ok(()),
    }
}

/// Checks one database's settings (each of a config's `[[databases]]` too), its retention
/// policy included.
pub fn check_options(o: &ArchiverOptions) -> Result<(), InvalidSetting> {
    for (key, value) in [
        ("sync_interval", o.sync_interval),
        ("base_interval", o.base_interval),
        ("checkpoint_interval", o.checkpoint_interval),
        ("poll_interval", o.poll_interval),
    ] {
        check(key, value, Bound::Positive)?;
    }
    check("lease_ttl", o.lease_ttl, Bound::AtLeast(MIN_LEASE_TTL))?;
    if !SEGMENT_BYTES.contains(&o.max_segment_bytes) {
        return Err(InvalidSetting {
            key: "max_segment_bytes".to_owned(),
            value: o.max_segment_bytes.to_string(),
            problem: format!(
                "is out of range: give {} to {} bytes (the default, 32 MiB, suits most \
                 databases; the archiver holds up to three segments in memory)",
                SEGMENT_BYTES.start(),
                SEGMENT_BYTES.end()
            ),
        });
    }
    for (key, level) in [
        ("zstd_level", o.zstd_level),
        ("catch_up_zstd_level", o.catch_up_zstd_level),
    ] {
        if let Err(problem) = tidemark_manifest::segment::check_zstd_level(level) {
            return Err(InvalidSetting {
                key: key.to_owned(),
                value: level.to_string(),
                problem,
            });
        }
    }
    check_replay(o)?;
    let Some(r) = &o.retention else {
        return Ok(());
    };
    check_retention(r)?;
    if r.grace.is_zero() {
        // The service sweeps on its own, unattended: with no grace it would delete what a
        // restore under way still reads. A one-shot `prune --grace 0s` stays possible.
        return Err(InvalidSetting {
            key: "retention.grace".to_owned(),
            value: "0s".to_owned(),
            problem: "would let the service delete objects that a restore under way still \
                      reads; give at least the longest restore you expect (e.g. 24h), or \
                      run `tidemark-archiver prune --grace 0s` once if you mean to delete at \
                      once"
                .to_owned(),
        });
    }
    Ok(())
}

/// Checks the replay bound: at most one of `max_replay` and `target_recovery_time`, each
/// more than zero, and a replay rate of at least one record per second.
fn check_replay(o: &ArchiverOptions) -> Result<(), InvalidSetting> {
    let refuse = |key: &str, value: String, problem: &str| InvalidSetting {
        key: key.to_owned(),
        value,
        problem: problem.to_owned(),
    };
    if let (Some(bound), Some(_)) = (o.max_replay, o.target_recovery_time) {
        return Err(refuse(
            "max_replay",
            bound.to_string(),
            "is given with target_recovery_time: both bound the same replay, give one (the              config file and --max-replay / --target-recovery-time are merged before this              is checked)",
        ));
    }
    if let Some(b @ (ReplayBound::Bytes(0) | ReplayBound::Records(0))) = o.max_replay {
        return Err(refuse(
            "max_replay",
            b.to_string(),
            "must be more than zero: give the WAL a restore may replay on top of the \
             newest base, e.g. 256MiB or 1000000 records, or leave it out",
        ));
    }
    if let Some(t) = o.target_recovery_time {
        check("target_recovery_time", t, Bound::Positive)?;
    }
    if o.restore_replay_rate == Some(0) {
        return Err(refuse(
            "restore_replay_rate",
            "0".to_owned(),
            "must be at least 1 WAL record per second (a drill's report gives the rate              measured on the restoring machine)",
        ));
    }
    Ok(())
}

/// Checks the durations of a retention policy (`[retention]`, or `prune`'s flags).
pub fn check_retention(p: &PruneOptions) -> Result<(), InvalidSetting> {
    for (key, value) in [
        ("retention.pitr_window", p.pitr_window),
        ("retention.keep_daily_for", p.keep_daily_for),
        ("retention.keep_weekly_for", p.keep_weekly_for),
        ("retention.keep_monthly_for", p.keep_monthly_for),
    ] {
        if let Some(value) = value {
            check(key, value, Bound::Positive)?;
        }
    }
    check("retention.grace", p.grace, Bound::ZeroOk)?;
    check("retention.interval", p.interval, Bound::Positive)
}

/// Checks one database's options once flags are applied (each of a config's
/// `[[databases]]` too): the limits above, the store settings, the retention rules.
pub fn check_settings(o: &ArchiverOptions) -> Result<(), ConfigError> {
    if !(1..=64).contains(&o.upload_concurrency) {
        return Err(ConfigError::Usage(format!(
            "upload concurrency {} is out of range: give --upload-concurrency (or \
             upload_concurrency in --config) a number of base files to upload at once from 1 \
             to 64",
            o.upload_concurrency
        )));
    }
    // Durations that cannot work, named by their keys.
    check_options(o)?;
    check_object_lock(o)?;
    // Bad store options are bad usage, whatever the command does first.
    o.store.s3_options()?;
    if let Some(r) = &o.retention {
        r.rules()?;
    }
    Ok(())
}

/// The object lock settings come together (both or neither) and within the format's limits
/// (FORMAT.md §3.2); how the lock meets the retention policy is checked at start, against
/// the repository's recorded lock.
pub fn check_object_lock(o: &ArchiverOptions) -> Result<(), ConfigError> {
    match (o.object_lock_mode, o.object_lock_days) {
        (None, None) => Ok(()),
        (Some(mode), Some(days)) => ObjectLock::new(mode, days)
            .map(|_| ())
            .map_err(|e| ConfigError::Usage(format!("object_lock_days: {e}"))),
        (Some(_), None) => Err(ConfigError::Usage(
            "--object-lock-mode (object_lock_mode) needs --object-lock-days \
             (object_lock_days): how many days each object stays locked"
                .to_owned(),
        )),
        (None, Some(_)) => Err(ConfigError::Usage(
            "--object-lock-days (object_lock_days) needs --object-lock-mode \
             (object_lock_mode): governance or compliance"
                .to_owned(),
        )),
    }
}

impl PruneOptions {
    /// The rules these options describe, checked.
    pub fn rules(&self) -> Result<Rules, PruneError> {
        let d = |v: Option<Duration>| -> Result<Option<time::Duration>, PruneError> {
            v.map(|d| {
                time::Duration::try_from(d)
                    .map_err(|_| PruneError::Policy(format!("{d:?} is too long")))
            })
            .transpose()
        };
        let rules = Rules {
            keep_last: self.keep_last,
            pitr_window: d(self.pitr_window)?,
            keep_daily_for: d(self.keep_daily_for)?,
            keep_weekly_for: d(self.keep_weekly_for)?,
            keep_monthly_for: d(self.keep_monthly_for)?,
        };
        rules
            .validate()
            .map_err(|e| PruneError::Policy(e.to_string()))?;
        if self.interval.is_zero() {
            return Err(PruneError::Policy(
                "retention interval must be longer than zero (e.g. 1h)".to_owned(),
            ));
        }
        Ok(rules)
    }
}

impl FleetConfig {
    /// Checks what must hold once flags are applied: every database has a `db` and a `to`,
    /// positive intervals, a valid repository URL; no two share a database directory, and
    /// no repository is another's or lies inside another's.
    pub fn validate(&self) -> Result<(), FileError> {
        let mut dbs: BTreeMap<PathBuf, &str> = BTreeMap::new();
        let mut repos: Vec<(&str, Option<&str>, StoreUrl)> = Vec::new();
        for d in &self.databases {
            let (name, o) = (&d.name, &d.options);
            if o.db.as_os_str().is_empty() {
                return Err(invalid(format!(
                    "database {name}: no database directory: add db = \"/path/to/db\" to its \
                     [[databases]] table"
                )));
            }
            if o.to.is_empty() {
                return Err(invalid(format!(
                    "database {name}: no repository: add to = \"s3://BUCKET/PREFIX\" or \
                     \"file:///ABSOLUTE/DIR\" to its [[databases]] table"
                )));
            }
            if o.sync_interval.is_zero()
                || o.base_interval.is_zero()
                || o.checkpoint_interval.is_zero()
            {
                return Err(invalid(format!(
                    "database {name}: intervals must be greater than zero"
                )));
            }
            let key = same_dir_key(&o.db);
            if let Some(other) = dbs.insert(key, name) {
                return Err(invalid(format!(
                    "databases {other} and {name} have the same db {}: each database directory \
                     is archived once, to one repository",
                    o.db.display()
                )));
            }
            let url =
                StoreUrl::parse(&o.to).map_err(|e| invalid(format!("database {name}: {e}")))?;
            let endpoint = o.store.access.endpoint_url.as_deref();
            for (other, other_endpoint, other_url) in &repos {
                if *other_endpoint == endpoint && nested(other_url, &url) {
                    let how = if same(other_url, &url) {
                        "the same repository"
                    } else {
                        "repositories inside one another"
                    };
                    return Err(invalid(format!(
                        "databases {other} and {name} have {how} ({other_url} and {url}): give \
                         each database its own prefix or directory"
                    )));
                }
            }
            repos.push((name, endpoint, url));
        }
        Ok(())
    }
}

/// A directory as compared for duplicates: canonical when it exists, else made absolute and
/// cleaned of `.` and `..` without touching the file system.
fn same_dir_key(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// True when both are the same repository.
fn same(a: &StoreUrl, b: &StoreUrl) -> bool {
    match (a, b) {
        (StoreUrl::Local { root: ra }, StoreUrl::Local { root: rb }) => {
            same_dir_key(ra) == same_dir_key(rb)
        }
        _ => a == b,
    }
}

/// True when one repository is the other or lies inside it.
pub(crate) fn nested(a: &StoreUrl, b: &StoreUrl) -> bool {
    fn within(outer: &str, inner: &str) -> bool {
        outer.is_empty()
            || inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|r| r.starts_with('/'))
    }
    match (a, b) {
        (
            StoreUrl::S3 {
                bucket: ba,
                prefix: pa,
            },
            StoreUrl::S3 {
                bucket: bb,
                prefix: pb,
            },
        ) => ba == bb && (within(pa, pb) || within(pb, pa)),
        (StoreUrl::Local { root: ra }, StoreUrl::Local { root: rb }) => {
            let (ra, rb) = (same_dir_key(ra), same_dir_key(rb));
            ra.starts_with(&rb) || rb.starts_with(&ra)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: u64 = 31_557_600;

    fn refused(o: &ArchiverOptions) -> String {
        check_options(o).unwrap_err().to_string()
    }

    #[test]
    fn the_defaults_and_a_century_pass() {
        check_options(&ArchiverOptions::default()).unwrap();
        let century = Duration::from_secs(100 * YEAR);
        check_options(&ArchiverOptions {
            base_interval: century,
            lease_ttl: MIN_LEASE_TTL,
            retention: Some(PruneOptions {
                pitr_window: Some(century),
                keep_monthly_for: Some(century),
                grace: century,
                ..PruneOptions::default()
            }),
            ..ArchiverOptions::default()
        })
        .unwrap();
    }

    #[test]
    fn durations_past_a_century_are_refused_naming_the_key() {
        let absurd = Duration::from_secs(1_000_000_000 * YEAR);
        let retention = |p: PruneOptions| ArchiverOptions {
            retention: Some(p),
            ..ArchiverOptions::default()
        };
        for (key, o) in [
            (
                "base_interval",
                ArchiverOptions {
                    base_interval: absurd,
                    ..ArchiverOptions::default()
                },
            ),
            (
                "lease_ttl",
                ArchiverOptions {
                    lease_ttl: absurd,
                    ..ArchiverOptions::default()
                },
            ),
            (
                "retention.pitr_window",
                retention(PruneOptions {
                    pitr_window: Some(absurd),
                    ..PruneOptions::default()
                }),
            ),
            (
                "retention.keep_weekly_for",
                retention(PruneOptions {
                    keep_last: Some(1),
                    keep_weekly_for: Some(Duration::from_secs(100 * YEAR + 1)),
                    ..PruneOptions::default()
                }),
            ),
            (
                "retention.grace",
                retention(PruneOptions {
                    keep_last: Some(1),
                    grace: absurd,
                    ..PruneOptions::default()
                }),
            ),
        ] {
            let msg = refused(&o);
            assert!(msg.starts_with(&format!("{key} = \"")), "{key}: {msg}");
            assert!(msg.contains("longer than 100 years"), "{key}: {msg}");
        }
    }

    #[test]
    fn the_service_refuses_a_zero_grace_period_the_prune_command_takes_it() {
        let zero_grace = PruneOptions {
            keep_last: Some(1),
            grace: Duration::ZERO,
            ..PruneOptions::default()
        };
        check_retention(&zero_grace).unwrap();
        let msg = refused(&ArchiverOptions {
            retention: Some(zero_grace),
            ..ArchiverOptions::default()
        });
        assert!(msg.starts_with("retention.grace = \"0s\""), "{msg}");
        assert!(msg.contains("restore under way"), "{msg}");
    }

    #[test]
    fn segment_sizes_outside_64_kib_to_1_gib_are_refused() {
        for (bytes, ok) in [
            (0, false),
            ((64 << 10) - 1, false),
            (64 << 10, true),
            (1 << 30, true),
            ((1 << 30) + 1, false),
            (u64::MAX, false),
        ] {
            let o = ArchiverOptions {
                max_segment_bytes: bytes,
                ..ArchiverOptions::default()
            };
            match check_options(&o) {
                Ok(()) => assert!(ok, "{bytes} passed"),
                Err(e) => {
                    assert!(!ok, "{bytes} refused: {e}");
                    let msg = e.to_string();
                    assert!(
                        msg.starts_with(&format!("max_segment_bytes = \"{bytes}\" is out of range: give 65536 to 1073741824 bytes")),
                        "{msg}"
                    );
                }
            }
        }
    }

    #[test]
    fn zstd_levels_zstd_does_not_have_are_refused_naming_the_key() {
        let levels = tidemark_manifest::segment::zstd_levels();
        for (level, says) in [
            (*levels.start() - 1, "is not a zstd level: give"),
            (*levels.end() + 1, "is not a zstd level: give"),
            (100, "is not a zstd level: give"),
            (i32::MIN, "is not a zstd level: give"),
            (0, "is zstd's default level, 3, in disguise: give 3"),
        ] {
            for key in ["zstd_level", "catch_up_zstd_level"] {
                let mut o = ArchiverOptions::default();
                *(if key == "zstd_level" {
                    &mut o.zstd_level
                } else {
                    &mut o.catch_up_zstd_level
                }) = level;
                let msg = check_options(&o).unwrap_err().to_string();
                assert!(
                    msg.starts_with(&format!("{key} = \"{level}\" {says}")),
                    "{msg}"
                );
            }
        }
        for level in [*levels.start(), -1, 1, 3, 19, *levels.end()] {
            let o = ArchiverOptions {
                zstd_level: level,
                catch_up_zstd_level: level,
                ..ArchiverOptions::default()
            };
            check_options(&o).unwrap();
        }
    }

    #[test]
    fn zero_intervals_are_refused_naming_the_key() {
        let zero = Duration::ZERO;
        for (key, o) in [
            (
                "sync_interval",
                ArchiverOptions {
                    sync_interval: zero,
                    ..ArchiverOptions::default()
                },
            ),
            (
                "poll_interval",
                ArchiverOptions {
                    poll_interval: zero,
                    ..ArchiverOptions::default()
                },
            ),
            (
                "retention.interval",
                ArchiverOptions {
                    retention: Some(PruneOptions {
                        keep_last: Some(1),
                        interval: zero,
                        ..PruneOptions::default()
                    }),
                    ..ArchiverOptions::default()
                },
            ),
            (
                "retention.pitr_window",
                ArchiverOptions {
                    retention: Some(PruneOptions {
                        pitr_window: Some(zero),
                        ..PruneOptions::default()
                    }),
                    ..ArchiverOptions::default()
                },
            ),
        ] {
            let msg = refused(&o);
            assert!(
                msg.starts_with(&format!("{key} = \"0s\" must be longer than zero")),
                "{key}: {msg}"
            );
        }
    }

    #[test]
    fn the_replay_bound_is_one_of_bytes_records_or_a_time_and_more_than_zero() {
        let bound = |text: &str| text.parse::<ReplayBound>();
        assert_eq!(bound("256MiB"), Ok(ReplayBound::Bytes(256 << 20)));
        assert_eq!(bound(" 1.5 GB "), Ok(ReplayBound::Bytes(1_500_000_000)));
        assert_eq!(bound("4096B"), Ok(ReplayBound::Bytes(4096)));
        assert_eq!(
            bound("1000000 records"),
            Ok(ReplayBound::Records(1_000_000))
        );
        for (nonsense, why) in [
            ("", "must start with a number"),
            ("lots", "must start with a number"),
            ("256", "needs a unit"),
            ("256 parsecs", "unknown unit \"parsecs\""),
            ("1.5 records", "whole number"),
            ("99999999999999999999 records", "too large"),
            ("1e30GB", "unknown unit"),
        ] {
            let e = bound(nonsense).unwrap_err();
            assert!(e.contains(why), "{nonsense:?}: {e}");
            assert!(e.contains("examples: 256MiB"), "{nonsense:?}: {e}");
        }
        // Through the config file, as serde reads it.
        let o: ArchiverOptions =
            toml::from_str("max_replay = \"64MiB\"\nrestore_replay_rate = 1000").unwrap();
        assert_eq!(o.max_replay, Some(ReplayBound::Bytes(64 << 20)));
        check_options(&o).unwrap();
        let e = toml::from_str::<ArchiverOptions>("max_replay = \"soon\"").unwrap_err();
        assert!(e.to_string().contains("invalid replay bound"), "{e}");
        let o: ArchiverOptions = toml::from_str("target_recovery_time = \"5m\"").unwrap();
        assert_eq!(o.target_recovery_time, Some(Duration::from_secs(300)));
        check_options(&o).unwrap();

        for (o, want) in [
            (
                ArchiverOptions {
                    max_replay: Some(ReplayBound::Bytes(0)),
                    ..ArchiverOptions::default()
                },
                "max_replay = \"0B\" must be more than zero",
            ),
            (
                ArchiverOptions {
                    max_replay: Some(ReplayBound::Records(0)),
                    ..ArchiverOptions::default()
                },
                "max_replay = \"0 records\" must be more than zero",
            ),
            (
                ArchiverOptions {
                    target_recovery_time: Some(Duration::ZERO),
                    ..ArchiverOptions::default()
                },
                "target_recovery_time = \"0s\" must be longer than zero",
            ),
            (
                ArchiverOptions {
                    target_recovery_time: Some(Duration::from_secs(1_000 * YEAR)),
                    ..ArchiverOptions::default()
                },
                "longer than 100 years",
            ),
            (
                ArchiverOptions {
                    max_replay: Some(ReplayBound::Bytes(1 << 30)),
                    target_recovery_time: Some(Duration::from_secs(300)),
                    ..ArchiverOptions::default()
                },
                "max_replay = \"1073741824B\" is given with target_recovery_time",
            ),
            (
                ArchiverOptions {
                    restore_replay_rate: Some(0),
                    ..ArchiverOptions::default()
                },
                "restore_replay_rate = \"0\" must be at least 1",
            ),
        ] {
            let msg = refused(&o);
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn a_lease_too_short_to_renew_is_refused() {
        let msg = refused(&ArchiverOptions {
            lease_ttl: Duration::from_secs(3),
            ..ArchiverOptions::default()
        });
        assert!(
            msg.starts_with("lease_ttl = \"3s\" is shorter than 10s"),
            "{msg}"
        );
        assert!(msg.contains("renewed"), "{msg}");
    }
}
