//! The integration tests, one binary (as zero2prod's `tests/api`): the harness in `support`
//! serves every module, so a helper nobody uses is a compiler warning, not dead weight, and
//! the crate is linked once. Real Redis and PostgreSQL servers throughout, started by the
//! tests on free loopback ports; `web` in-process or as the real binary.

mod api;
mod chaos;
mod db_role;
mod faults;
mod limits;
mod monitoring;
mod outage_table;
mod process;
mod redis_users;
mod runbook;
mod support;
mod tls;
