//! The exit codes of `tidemark-archiver` and `tidemark-restore`, in one place.
//!
//! A number means the same thing in both programs, and no two meanings share a number, so
//! a script or a service manager can act on a code without knowing which program gave it.
//! The numbers are a public interface: never renumber one, only add. README.md lists them in
//! one table ([`ALL`] is that table; a test keeps the two equal).

/// Success.
pub const OK: u8 = 0;
/// A failure not covered below: I/O, network (the store still unreachable after retries),
/// RocksDB, an interruption. Trying again later may work. With `[[databases]]`, the
/// archiver's `run` and `backup` exit with it when any database had failed.
pub const FAILURE: u8 = 1;
/// Bad usage, configuration or input: an unknown option, a setting that cannot work, a
/// malformed time or URL, no repository at the URL, a database that cannot be archived
/// (the message says what to change). Nothing was started or written; trying again
/// unchanged fails again.
pub const USAGE: u8 = 2;
/// `tidemark-restore`: the requested point cannot be restored from this repository (before
/// or after its window, in a gap).
pub const NOT_RESTORABLE: u8 = 3;
/// Data did not verify: a missing or corrupt object, a broken WAL chain, a restored
/// database that does not end where planned, problems found by `tidemark-restore verify`,
/// or a damaged repository reported by `tidemark-archiver status`.
pub const VERIFICATION_FAILED: u8 = 4;
/// `tidemark-restore drill`: the drill ran and failed (its report says in which phase and
/// why).
pub const DRILL_FAILED: u8 = 5;
/// `tidemark-restore verify`: no problem found, but the content of some objects was not
/// read (sizes only, the default on S3); `--deep` reads every byte.
pub const CONTENT_NOT_CHECKED: u8 = 6;
/// `tidemark-archiver`: another archiver (or a `prune`) holds the repository's lease, or
/// took it over while this one ran; nothing more was written. Started again, it waits for
/// the lease to be free.
pub const LEASE_HELD: u8 = 7;
/// `tidemark-archiver status`: a freshness threshold given on the command line
/// (`--max-lag`, `--max-base-age`) was exceeded.
pub const THRESHOLD_EXCEEDED: u8 = 8;
/// `tidemark-restore`: stopped at once by a second Ctrl-C (128 + SIGINT, the shell's
/// convention); a staging directory may be left beside the target.
pub const INTERRUPTED_AT_ONCE: u8 = 130;
/// `tidemark-restore`: standard output was closed by its reader (`list | head`): 128 +
/// SIGPIPE, the shell's convention.
pub const BROKEN_PIPE: u8 = 141;

/// Which program gives a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `tidemark-archiver`.
    Archiver,
    /// `tidemark-restore`.
    Restore,
    /// Both.
    Both,
}

/// One exit code: its number, its constant's name, who gives it, what it means.
#[derive(Debug, Clone, Copy)]
pub struct Code {
    pub code: u8,
    pub name: &'static str,
    pub program: Program,
    /// One line, as `--help` and README.md show it.
    pub meaning: &'static str,
}

/// Every exit code, in order.
pub const ALL: &[Code] = &[
    Code {
        code: OK,
        name: "OK",
        program: Program::Both,
        meaning: "success",
    },
    Code {
        code: FAILURE,
        name: "FAILURE",
        program: Program::Both,
        meaning: "failure: I/O, network, RocksDB, interrupted; with [[databases]], any database had failed",
    },
    Code {
        code: USAGE,
        name: "USAGE",
        program: Program::Both,
        meaning: "bad usage, configuration or input (the message says what to change); nothing was done",
    },
    Code {
        code: NOT_RESTORABLE,
        name: "NOT_RESTORABLE",
        program: Program::Restore,
        meaning: "the target is not restorable from this repository (before or after the window, in a gap)",
    },
    Code {
        code: VERIFICATION_FAILED,
        name: "VERIFICATION_FAILED",
        program: Program::Both,
        meaning: "verification failed: a missing or corrupt object, a broken WAL chain, a result that does not end where planned; `status`: the repository is damaged",
    },
    Code {
        code: DRILL_FAILED,
        name: "DRILL_FAILED",
        program: Program::Restore,
        meaning: "drill: the drill ran and failed; its report says in which phase and why",
    },
    Code {
        code: CONTENT_NOT_CHECKED,
        name: "CONTENT_NOT_CHECKED",
        program: Program::Restore,
        meaning: "verify: no problem found, but only sizes were read, not content (the default on S3; --deep reads every byte)",
    },
    Code {
        code: LEASE_HELD,
        name: "LEASE_HELD",
        program: Program::Archiver,
        meaning: "another archiver or prune holds the repository's lease, or took it over",
    },
    Code {
        code: THRESHOLD_EXCEEDED,
        name: "THRESHOLD_EXCEEDED",
        program: Program::Archiver,
        meaning: "status: a threshold (--max-lag, --max-base-age) was exceeded",
    },
    Code {
        code: INTERRUPTED_AT_ONCE,
        name: "INTERRUPTED_AT_ONCE",
        program: Program::Restore,
        meaning: "stopped at once by a second Ctrl-C (a staging directory may be left)",
    },
    Code {
        code: BROKEN_PIPE,
        name: "BROKEN_PIPE",
        program: Program::Restore,
        meaning: "standard output was closed by its reader",
    },
];

/// The exit codes `program` gives, as the text after its `--help`.
pub fn help(program: Program) -> String {
    let mut out = String::from("Exit codes:\n");
    for c in ALL
        .iter()
        .filter(|c| c.program == program || c.program == Program::Both)
    {
        out.push_str(&format!("  {:>3}  {}\n", c.code, c.meaning));
    }
    out.push_str("(README.md lists the codes of both programs; no number has two meanings.)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_meaning() {
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[i + 1..] {
                assert_ne!(a.code, b.code, "{} and {} share a number", a.name, b.name);
            }
        }
        assert!(ALL.windows(2).all(|w| w[0].code < w[1].code));
    }

    /// README.md's table lists exactly these codes, with these names.
    #[test]
    fn the_readme_table_is_this_table() {
        let readme = include_str!("../../README.md");
        let rows: Vec<(u8, String)> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let code = cells.get(1)?.trim_matches('`').parse().ok()?;
                let name = cells.get(2)?.trim_matches('`').to_owned();
                name.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_')
                    .then_some((code, name))
            })
            .collect();
        let want: Vec<(u8, String)> = ALL.iter().map(|c| (c.code, c.name.to_owned())).collect();
        assert_eq!(
            rows, want,
            "README.md's exit code table differs from exit::ALL"
        );
    }

    #[test]
    fn help_lists_each_programs_codes() {
        let archiver = help(Program::Archiver);
        assert!(archiver.contains("    7  another archiver"), "{archiver}");
        assert!(!archiver.contains("    3  "), "{archiver}");
        let restore = help(Program::Restore);
        assert!(
            restore.contains("    3  the target is not restorable"),
            "{restore}"
        );
        assert!(!restore.contains("    7  "), "{restore}");
    }
}
