//! The integration suite: one test binary (one link, not one per file) whose
//! modules start the real service against real PostgreSQL and Redis Cluster.
//!
//! Run it with `scripts/test`, which starts those and exports their addresses.

mod kit;

mod admin;
mod cli;
mod foundation;
mod storage;
mod tokens;
