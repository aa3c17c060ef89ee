//! The one integration test binary. Each module is a scenario over the shared harness in
//! `support/`: real PostgreSQL clusters, real durable-streams-server processes and the pgds
//! binary, one of each per test. Run it through `scripts/test`, which installs the streams server.

mod support;

mod checkpoint;
mod errors;
mod faults;
mod harness;
mod membership;
mod ops;
mod pipeline;
mod restart;
mod resync;
mod schema;
mod snapshot;
mod tail;
mod truncate;
mod types;
