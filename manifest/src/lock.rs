//! S3 Object Lock in a repository (FORMAT.md §3.2): which objects are written with a
//! retain-until date, what that date is, when an object a sweep found unreferenced may be
//! deleted, and how a lock meets a retention policy.
//!
//! The rule: an object written at `T` in a repository whose `tidemark.json` records a lock
//! of `D` days is written with the retain-until date `T + D` (the writer's clock), and a
//! pruner treats it as locked until `T' + D + CLOCK_MARGIN`, where `T'` is the time the
//! store says it was written (its `Last-Modified`), so that a writer's clock running ahead
//! of the store's never makes a sweep try a deletion the store refuses.

use std::fmt;

use time::OffsetDateTime;

use crate::keys;
use crate::model::{LockMode, ObjectLock};

/// The longest lock, in days: 100 years, the longest span any duration in Tidemark may be
/// (`retention::MAX_DURATION`), and far beyond any retention obligation.
pub const MAX_DAYS: u32 = 36_500;

/// How much later than `Last-Modified + days` a pruner treats an object as still locked:
/// the writer sets the date from its own clock, which may run ahead of the store's.
pub const CLOCK_MARGIN: time::Duration = time::Duration::hours(1);

/// A lock that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error(
        "an object lock of {days} days is not possible: give between 1 and {MAX_DAYS} days \
         (S3 keeps a locked object for at least a day; {MAX_DAYS} days is 100 years)"
    )]
    Days { days: u32 },
    #[error(
        "an object lock of {lock_days} days makes the retention policy impossible: {reason}. \
         Shorten the lock or change the policy"
    )]
    Retention { lock_days: u32, reason: String },
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        })
    }
}

impl std::str::FromStr for LockMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            _ => Err(format!(
                "'{s}' is not an object lock mode: give governance or compliance"
            )),
        }
    }
}

impl fmt::Display for ObjectLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} for {} days", self.mode, self.days)
    }
}

impl ObjectLock {
    /// A lock of `days` days, refused outside 1 to [`MAX_DAYS`].
    pub fn new(mode: LockMode, days: u32) -> Result<ObjectLock, LockError> {
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(LockError::Days { days });
        }
        Ok(ObjectLock { mode, days })
    }

    /// Checks a lock read from a document (the same limits as [`ObjectLock::new`]).
    pub fn validate(&self) -> Result<(), LockError> {
        ObjectLock::new(self.mode, self.days).map(|_| ())
    }

    /// The lock's length.
    pub fn duration(&self) -> time::Duration {
        time::Duration::days(i64::from(self.days))
    }

    /// The retain-until date of an object written at `written_at`.
    pub fn retain_until(&self, written_at: OffsetDateTime) -> OffsetDateTime {
        written_at.saturating_add(self.duration())
    }

    /// Until when a pruner must treat as locked an object the store says was written at
    /// `written_at` (its `Last-Modified`): [`ObjectLock::retain_until`] plus
    /// [`CLOCK_MARGIN`].
    pub fn locked_until(&self, written_at: OffsetDateTime) -> OffsetDateTime {
        self.retain_until(written_at).saturating_add(CLOCK_MARGIN)
    }

    /// Whether a new reference (a base backup reusing a table file) may rely on an object
    /// the store says was written at `written_at`, instead of writing it again with a fresh
    /// lock: only while at least half of its lock is left, so that every object a new base
    /// references stays locked for at least half the lock after it. Unknown write time: no.
    pub fn reusable(&self, written_at: Option<OffsetDateTime>, now: OffsetDateTime) -> bool {
        let half = time::Duration::seconds(self.duration().whole_seconds() / 2);
        written_at.is_some_and(|t| self.retain_until(t) >= now.saturating_add(half))
    }

    /// Whether an object written at `written_at` may still be locked at `now`. An object
    /// whose write time the store does not say (`None`) is treated as locked: nothing is
    /// deleted on a guess.
    pub fn is_locked(&self, written_at: Option<OffsetDateTime>, now: OffsetDateTime) -> bool {
        written_at.is_none_or(|t| now < self.locked_until(t))
    }
}

/// Whether the object at `key` is written with the repository's lock: every object of the
/// layout but the two that must change, `lease.json` (compare-and-swap) and the hint
/// `manifest/latest.json` (overwritten), and no key outside the layout (a store check's
/// `probe/…` objects, which it deletes again at once).
pub fn applies_to(key: &str) -> bool {
    !matches!(
        keys::parse_listed_key(key),
        Err(_) | Ok(keys::LayoutKey::Lease | keys::LayoutKey::LatestHint)
    )
}

/// How a lock meets a retention policy whose longest horizon (how far back it keeps every
/// point or base: the window or the longest tier) is `horizon`, `None` for a policy that
/// only counts bases (`keep_last`) or for no policy at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetentionFit {
    /// The lock ends before retention lets go of an object: objects retention keeps longer
    /// than the lock are unprotected for the rest of their time.
    Shorter { unprotected_days: u32 },
    /// The lock outlasts retention: objects the policy drops stay stored (and billed) until
    /// their lock ends, up to this many days longer.
    Longer { extra_days: u32 },
    /// No time horizon to compare with.
    Unknown,
}

/// Checks a lock against a retention policy (FORMAT.md §3.2). Retention says what must be
/// kept at the least, and a lock only keeps objects longer, so a lock never makes a policy
/// wrong; it makes one impossible only when a pruned object could never be deleted: when
/// the lock's end lies beyond the time any date can be represented from now. Otherwise the
/// result says what the combination costs or leaves unprotected, for the log.
pub fn check_retention(
    lock: &ObjectLock,
    horizon: Option<time::Duration>,
    now: OffsetDateTime,
) -> Result<RetentionFit, LockError> {
    lock.validate()?;
    if now.checked_add(lock.duration() + CLOCK_MARGIN).is_none() {
        return Err(LockError::Retention {
            lock_days: lock.days,
            reason: "its end cannot be represented, so no pruned object could ever be deleted"
                .to_owned(),
        });
    }
    let Some(horizon) = horizon else {
        return Ok(RetentionFit::Unknown);
    };
    let horizon_days = u32::try_from(horizon.whole_days().max(0)).unwrap_or(u32::MAX);
    Ok(if lock.days < horizon_days {
        RetentionFit::Shorter {
            unprotected_days: horizon_days - lock.days,
        }
    } else {
        RetentionFit::Longer {
            extra_days: lock.days - horizon_days,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn an_object_written_at_t_is_locked_until_t_plus_d() {
        let lock = ObjectLock::new(LockMode::Governance, 7).unwrap();
        let written = t("2026-12-01T10:00:00Z");
        assert_eq!(lock.retain_until(written), t("2026-12-08T10:00:00Z"));
        assert_eq!(lock.locked_until(written), t("2026-12-08T11:00:00Z"));
        assert!(lock.is_locked(Some(written), t("2026-12-08T10:59:59Z")));
        assert!(!lock.is_locked(Some(written), t("2026-12-08T11:00:00Z")));
        assert!(lock.is_locked(None, t("2100-01-01T00:00:00Z")));
    }

    #[test]
    fn an_object_is_reused_while_half_its_lock_is_left() {
        let lock = ObjectLock::new(LockMode::Compliance, 10).unwrap();
        let written = t("2026-12-01T00:00:00Z");
        assert!(lock.reusable(Some(written), t("2026-12-06T00:00:00Z")));
        assert!(!lock.reusable(Some(written), t("2026-12-06T00:00:01Z")));
        assert!(!lock.reusable(None, written));
    }

    #[test]
    fn days_outside_the_limits_are_refused() {
        for days in [0, MAX_DAYS + 1] {
            let err = ObjectLock::new(LockMode::Compliance, days).unwrap_err();
            assert!(err.to_string().contains("between 1 and 36500"), "{err}");
        }
        ObjectLock::new(LockMode::Compliance, MAX_DAYS).unwrap();
    }

    #[test]
    fn the_lease_the_hint_and_foreign_keys_are_not_locked() {
        for key in ["lease.json", "manifest/latest.json", "probe/x/y", "junk"] {
            assert!(!applies_to(key), "{key}");
        }
        for key in [
            "tidemark.json",
            "manifest/0000000000000001.json",
            "wal/0000000000000001.seg",
            "index/0000000000000001-0000000000000002.json",
            "bases/b20261123T133000Z-1a2b3c4d/base.json",
            "bases/b20261123T133000Z-1a2b3c4d/files/CURRENT",
            "sst/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(applies_to(key), "{key}");
        }
    }

    #[test]
    fn a_lock_meets_retention() {
        let now = t("2026-12-01T00:00:00Z");
        let lock = ObjectLock::new(LockMode::Compliance, 30).unwrap();
        assert_eq!(
            check_retention(&lock, Some(time::Duration::days(7)), now),
            Ok(RetentionFit::Longer { extra_days: 23 })
        );
        assert_eq!(
            check_retention(&lock, Some(time::Duration::days(90)), now),
            Ok(RetentionFit::Shorter {
                unprotected_days: 60
            })
        );
        assert_eq!(check_retention(&lock, None, now), Ok(RetentionFit::Unknown));
        // Far longer than the policy is costly, not impossible.
        let long = ObjectLock::new(LockMode::Compliance, MAX_DAYS).unwrap();
        assert!(matches!(
            check_retention(&long, Some(time::Duration::days(1)), now),
            Ok(RetentionFit::Longer { .. })
        ));
        // A lock whose end no date can hold: nothing pruned could ever be deleted.
        let err = check_retention(&lock, None, t("9999-12-20T00:00:00Z")).unwrap_err();
        assert!(err.to_string().contains("impossible"), "{err}");
        let bad = ObjectLock {
            mode: LockMode::Governance,
            days: 0,
        };
        assert!(check_retention(&bad, None, now).is_err());
    }

    #[test]
    fn modes_parse_and_print() {
        assert_eq!("GOVERNANCE".parse::<LockMode>(), Ok(LockMode::Governance));
        assert_eq!("compliance".parse::<LockMode>(), Ok(LockMode::Compliance));
        assert!("strict".parse::<LockMode>().is_err());
        assert_eq!(
            ObjectLock::new(LockMode::Compliance, 30)
                .unwrap()
                .to_string(),
            "COMPLIANCE for 30 days"
        );
    }
}
