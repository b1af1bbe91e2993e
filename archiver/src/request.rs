//! Base backup requests from `tidemark-archiver backup` to the archiver running beside the
//! same database on this machine.
//!
//! No signal goes to a pid read from anywhere: a lease's host name and pid say nothing
//! certain (containers share host names and pid 1, and a dead archiver's pid may belong to
//! any process by now). Instead:
//!
//! - the *liveness lock* beside the database ([`crate::lease::liveness_lock_path`]), an
//!   `flock` every archiver holds for its life, tells whether an archiver of this database
//!   runs on this machine: if it is free, none does, whatever the lease says;
//! - the request is a file in the database's scratch directory ([`REQUEST_FILE`], holding a
//!   token the requester drew), which only the archiver of this database reads: it notices
//!   it within its poll interval, removes it, answers in [`TAKEN_FILE`] that it took the
//!   request, and in [`DONE_FILE`] how the next base it started ended, each with the
//!   token, so the requester knows the answer is to its own request.
//!
//! SIGUSR1 to the service stays a manual trigger for operators.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// The request file in the scratch directory (its content: the requester's token).
pub const REQUEST_FILE: &str = "base-requested";
/// The archiver's answer that it took a request: the token.
pub const TAKEN_FILE: &str = "base-request.taken";
/// The archiver's answer that the base it started for a request ended: the token, then
/// `ok <base id>` or `failed <reason>` on the next line.
pub const DONE_FILE: &str = "base-request.done";

/// True when an archiver of the database `db` runs on this machine: it holds the liveness
/// lock beside the database. A lock file that does not exist is free.
pub fn archiver_alive(db: &Path) -> io::Result<bool> {
    let path = crate::lease::liveness_lock_path(db);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open the liveness lock {}: {e}", path.display()),
            ));
        }
    };
    // A shared lock, released at once (the file is closed): it never keeps an archiver
    // from taking the lock for more than an instant.
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(io::Error::new(
            e.kind(),
            format!("cannot test the liveness lock {}: {e}", path.display()),
        )),
    }
}

/// Writes a request into `scratch` (created if needed), replacing any earlier one and its
/// answers; returns its token.
pub fn send(scratch: &Path) -> io::Result<String> {
    std::fs::create_dir_all(scratch)?;
    for answer in [TAKEN_FILE, DONE_FILE] {
        remove_if_present(&scratch.join(answer))?;
    }
    let token = uuid::Uuid::new_v4().to_string();
    write_atomically(&scratch.join(REQUEST_FILE), format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Withdraws the request `token` if the archiver has not taken it (a requester that gave
/// up waiting). Returns true when it was still there.
pub fn withdraw(scratch: &Path, token: &str) -> io::Result<bool> {
    let path = scratch.join(REQUEST_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim() == token => {
            remove_if_present(&path)?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// What the archiver answered to a request so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing yet.
    None,
    /// It took the request; the base has not ended yet.
    Taken,
    /// The base it started for the request was taken: its id.
    Done(String),
    /// The base it started for the request failed (or it stopped first): why.
    Failed(String),
}

/// The archiver's answer to the request `token`, read from `scratch`.
pub fn answer(scratch: &Path, token: &str) -> io::Result<Answer> {
    if let Some(rest) = read_answer(&scratch.join(DONE_FILE), token)? {
        return Ok(match rest.split_once(' ') {
            Some(("ok", id)) => Answer::Done(id.to_owned()),
            Some((_, why)) => Answer::Failed(why.to_owned()),
            None => Answer::Failed(rest),
        });
    }
    if read_answer(&scratch.join(TAKEN_FILE), token)?.is_some() {
        return Ok(Answer::Taken);
    }
    Ok(Answer::None)
}

/// The rest of an answer file whose first line is `token`, if it is.
fn read_answer(path: &Path, token: &str) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut lines = text.lines();
            Ok((lines.next() == Some(token)).then(|| lines.next().unwrap_or("").to_owned()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The archiver's side: takes requests from its scratch directory and answers them.
#[derive(Debug)]
pub struct Inbox {
    scratch: PathBuf,
    /// Taken, waiting for a base to start.
    taken: Vec<String>,
    /// Waiting for the base in progress to end.
    in_base: Vec<String>,
}

impl Inbox {
    pub fn new(scratch: &Path) -> Inbox {
        Inbox {
            scratch: scratch.to_owned(),
            taken: Vec::new(),
            in_base: Vec::new(),
        }
    }

    /// Takes the request waiting in the scratch directory, if there is one: removes it and
    /// answers that it was taken. True when one was taken (a base is needed now).
    pub fn take(&mut self) -> bool {
        let path = self.scratch.join(REQUEST_FILE);
        let token = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read a base request");
                return false;
            }
        };
        if let Err(e) = remove_if_present(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a base request");
            return false;
        }
        tracing::info!("base backup requested");
        self.answer(TAKEN_FILE, &format!("{token}\n"));
        self.taken.push(token);
        true
    }

    /// True when requests were taken that no base started for yet.
    pub fn waiting(&self) -> bool {
        !self.taken.is_empty()
    }

    /// A base started: it answers every request taken before.
    pub fn base_started(&mut self) {
        self.in_base.append(&mut self.taken);
    }

    /// The base in progress ended (`Ok(base id)` or `Err(why)`).
    pub fn base_ended(&mut self, outcome: Result<String, String>) {
        let line = match &outcome {
            Ok(id) => format!("ok {id}"),
            Err(why) => format!("failed {}", why.replace('\n', " ")),
        };
        for token in std::mem::take(&mut self.in_base) {
            self.answer(DONE_FILE, &format!("{token}\n{line}\n"));
        }
    }

    /// At shutdown: requests still waiting for a base are answered as failed.
    pub fn stopped(&mut self) {
        self.in_base.append(&mut self.taken);
        self.base_ended(Err("the archiver stopped before the base ended".to_owned()));
    }

    fn answer(&self, name: &str, text: &str) {
        let path = self.scratch.join(name);
        if let Err(e) = write_atomically(&path, text.as_bytes()) {
            tracing::warn!(file = %path.display(), error = %e, "cannot answer a base request");
        }
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `path` whole or not at all: a temporary file beside it, renamed.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .map_or_else(|| "request".into(), |n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = File::create_new(&temp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_taken_and_answered_with_its_token() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        let mut inbox = Inbox::new(&scratch);
        assert!(!inbox.take());
        let token = send(&scratch).unwrap();
        assert_eq!(answer(&scratch, &token).unwrap(), Answer::None);
        assert!(inbox.take());
        assert!(!scratch.join(REQUEST_FILE).exists());
        assert_eq!(answer(&scratch, &token).unwrap(), Answer::Taken);
        // A base that ends before one started for the request answers nothing.
        inbox.base_ended(Ok("old".into()));
        assert_eq!(answer(&scratch, &token).unwrap(), Answer::Taken);
        inbox.base_started();
        inbox.base_ended(Ok("b1".into()));
        assert_eq!(answer(&scratch, &token).unwrap(), Answer::Done("b1".into()));
        // Another requester's answers are not this one's.
        assert_eq!(answer(&scratch, "other").unwrap(), Answer::None);
        let second = send(&scratch).unwrap();
        assert!(withdraw(&scratch, &second).unwrap());
        assert!(!inbox.take());
        let third = send(&scratch).unwrap();
        assert!(inbox.take());
        inbox.stopped();
        assert!(
            matches!(answer(&scratch, &third).unwrap(), Answer::Failed(w) if w.contains("stopped"))
        );
    }

    #[test]
    fn the_liveness_lock_tells_whether_an_archiver_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        assert!(!archiver_alive(&db).unwrap(), "no lock file: none runs");
        let lock = crate::lease::liveness_lock_path(&db);
        let held = File::create(&lock).unwrap();
        assert!(!archiver_alive(&db).unwrap(), "a free lock: none runs");
        held.lock().unwrap();
        assert!(archiver_alive(&db).unwrap(), "a held lock: one runs");
        drop(held);
        assert!(!archiver_alive(&db).unwrap());
    }
}
