//! pgds: PostgreSQL logical replication → per-user Durable Streams.
//!
//! ```text
//! Postgres ──pgoutput──▶ source ──change──▶ router ──(user, event)──▶ assemble ──Part──▶ writer ──HTTP──▶ streams server
//!    ▲                                                                                     │
//!    └──────── confirmed flush LSN ◀── checkpoint (tracker + table) ◀── acknowledged parts ◀┘
//! ```
//! - [`source`]: replication session, pgoutput decoding, typed JSON values, catalog, slot.
//! - [`router`]: pure routing rules and the State Protocol event shape.
//! - [`assemble`]: a transaction's events per stream, in bounded chunks with `Stream-Seq`s.
//! - [`writer`]: batched, ordered, retried appends to the Durable Streams server.
//! - [`checkpoint`]: the highest commit LSN durable on every stream it touched.
//! - [`pipeline`]: wiring; [`check`]: `pgds check`; [`config`]: loading and validation.

pub mod assemble;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod lsn;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod router;
pub mod source;
pub mod tail;
pub mod writer;
