//! The integration suite: one test binary (one link, not one per file) whose
//! modules start the real service against real PostgreSQL and Redis Cluster.
//!
//! Run it with `scripts/test`, which starts those and exports their addresses.

mod kit;

mod admin;
mod cli;
mod client;
mod foundation;
mod hostile;
mod security;
mod sessions;
mod storage;
mod tokens;
