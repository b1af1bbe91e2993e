//! End-to-end tests for Tidemark with real RocksDB databases, real object stores and real
//! processes — and the tools they share: a deterministic RocksDB load generator
//! ([`workload`], binary `tidemark-loadgen`) and its oracle ([`oracle`]), which tells the
//! exact state a database had at any sequence number the generator reached, so that a
//! restored database can be compared with it key by key ([`state::State::diff`]).

pub mod faultproxy;
pub mod harness;
pub mod oracle;
pub mod rocks;
pub mod setup;
pub mod state;
pub mod workload;

pub use oracle::{BatchInfo, BatchRecord, Oracle, Replay, TimePoint, read_times};
pub use rocks::{
    cf_descriptors, count_db_files, db_options, open_db, open_db_read_only, read_db_state,
    read_db_state_and_seq, read_state,
};
pub use state::{COLUMN_FAMILIES, Op, OpKind, State};
pub use workload::{Generator, RunOptions, Summary, WorkloadConfig, run};
