//! The checkpoint table (`migrations/`): one row per slot, moved forward only, in code and in
//! SQL. It is the start position of the next session, so it must never be ahead of what is
//! durable on the streams server.

use tokio_postgres::Client;

use crate::lsn::Lsn;

/// The migrations pgds applies at start-up, in order; each is idempotent.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_checkpoint",
        include_str!("../../migrations/0001_checkpoint.sql"),
    ),
    (
        "0002_snapshots",
        include_str!("../../migrations/0002_snapshots.sql"),
    ),
    (
        "0003_frozen",
        include_str!("../../migrations/0003_frozen.sql"),
    ),
    (
        "0004_stream_tables",
        include_str!("../../migrations/0004_stream_tables.sql"),
    ),
];

/// Apply every migration (idempotent).
pub async fn migrate(client: &Client) -> Result<(), tokio_postgres::Error> {
    for (_, sql) in MIGRATIONS {
        client.batch_execute(sql).await?;
    }
    Ok(())
}

/// The stored checkpoint of `slot`, if any.
pub async fn load(client: &Client, slot: &str) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM pgds.checkpoints WHERE slot = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse().ok()))
}

/// Store `lsn` for `slot` unless a higher one is already stored.
pub async fn save(client: &Client, slot: &str, lsn: Lsn) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgds.checkpoints (slot, lsn) VALUES ($1, $2::text::pg_lsn) \
             ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, updated_at = now() \
             WHERE pgds.checkpoints.lsn < excluded.lsn",
            &[&slot, &lsn.to_string()],
        )
        .await?;
    Ok(())
}

/// Forget the checkpoint of `slot` (the slot was created anew: old positions mean nothing).
pub async fn reset(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("DELETE FROM pgds.checkpoints WHERE slot = $1", &[&slot])
        .await?;
    Ok(())
}
