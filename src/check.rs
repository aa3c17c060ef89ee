//! `pgds check`: verify that the database can serve the configuration, and say how to fix each
//! problem. `pgds run` performs the same checks before it starts.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::config::{Config, Route, TableName};
use crate::source::catalog::{self, TableInfo, quote_table};
use crate::source::slot;

/// What the database check found: problems stop pgds; notes are informational.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    /// The slot is held by another session: a problem for `pgds check`, a reason to wait for
    /// `pgds run` (the session of a pgds that just died lingers until Postgres notices).
    pub slot_busy: Option<slot::SlotError>,
    /// The primary key columns of each configured table that has one, as the check read them.
    pub primary_keys: HashMap<TableName, Vec<String>>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Every table pgds replicates: the configured ones and the users table.
pub fn replicated_tables(cfg: &Config) -> Vec<TableName> {
    let mut tables: Vec<TableName> = cfg.tables.iter().map(|t| t.table.clone()).collect();
    if let Some(u) = &cfg.users
        && !tables.contains(&u.table)
    {
        tables.push(u.table.clone());
    }
    tables
}

/// Check server settings, privileges, tables, columns, keys, replica identities and the slot.
pub async fn check_database(
    cfg: &Config,
    client: &Client,
) -> Result<Report, tokio_postgres::Error> {
    let mut report = Report::default();
    let wal_level = catalog::setting(client, "wal_level").await?;
    if wal_level != "logical" {
        report.problems.push(format!(
            "wal_level is {wal_level:?}, logical replication needs \"logical\": run ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart Postgres"
        ));
    }
    for setting in ["max_replication_slots", "max_wal_senders"] {
        let value = catalog::setting(client, setting).await?;
        if value.parse::<u32>().unwrap_or(0) == 0 {
            report.problems.push(format!(
                "{setting} is {value}: set it to at least 1 (e.g. 10) and restart Postgres"
            ));
        }
    }
    let (role, can_replicate) = catalog::can_replicate(client).await?;
    if !can_replicate {
        report.problems.push(format!(
            "role {role:?} may not stream replication: ALTER ROLE {role} REPLICATION (or use a role that has it)"
        ));
    }

    for table in replicated_tables(cfg) {
        let Some(info) = catalog::table_info(client, &table).await? else {
            report.problems.push(format!(
                "table {table} does not exist (or is not a table); create it or fix the config"
            ));
            continue;
        };
        check_table(cfg, &table, &info, &mut report);
        if cfg.table(&table.schema, &table.name).is_some() && !info.primary_key.is_empty() {
            report.primary_keys.insert(table, info.primary_key);
        }
    }

    match slot::inspect_slot(client, &cfg.postgres.slot).await {
        Ok(Some(())) => report.notes.push(format!(
            "replication slot {:?} exists and will be reused",
            cfg.postgres.slot
        )),
        Ok(None) => report.notes.push(format!(
            "replication slot {:?} does not exist and will be created",
            cfg.postgres.slot
        )),
        Err(slot::SlotError::Db(e)) => return Err(e),
        Err(e @ slot::SlotError::InUse { .. }) => report.slot_busy = Some(e),
        Err(e) => report.problems.push(e.to_string()),
    }
    Ok(report)
}

/// Why a table may need `REPLICA IDENTITY FULL`: routing or user id columns an UPDATE or
/// DELETE must carry in its old row, and published TOASTable columns it may leave out.
#[derive(Debug, Default)]
struct IdentityNeeds {
    routing: Vec<String>,
    toast: Vec<String>,
}

fn identity_needs(cfg: &Config, table: &TableName, info: &TableInfo) -> IdentityNeeds {
    let mut needs = IdentityNeeds::default();
    if info.replica_identity == 'f' {
        return needs;
    }
    let configured = cfg.table(&table.schema, &table.name);
    if let Some(Route::Column(c)) = configured.map(|t| &t.route)
        && info.has_column(c)
        && !info.identity_covers(c)
    {
        needs.routing.push(c.clone());
    }
    if let Some(u) = cfg.users.as_ref().filter(|u| u.table == *table)
        && info.has_column(&u.column)
        && !info.identity_covers(&u.column)
    {
        needs.routing.push(u.column.clone());
    }
    if let Some(t) = configured {
        needs.toast = info
            .toastable
            .iter()
            .filter(|c| !info.identity_covers(c) && !t.exclude_columns.contains(c))
            .cloned()
            .collect();
    }
    needs
}

fn check_table(cfg: &Config, table: &TableName, info: &TableInfo, report: &mut Report) {
    let quoted = quote_table(table);
    if !info.can_select {
        report.problems.push(format!(
            "table {table}: no SELECT privilege; GRANT SELECT ON {quoted} TO the pgds role"
        ));
    }
    if !info.owned {
        report.notes.push(format!(
            "table {table}: not owned by the pgds role; the publication must then be created by the owner (CREATE PUBLICATION {} FOR TABLE …)",
            cfg.postgres.publication
        ));
    }
    if let Some(t) = cfg.table(&table.schema, &table.name) {
        if info.primary_key.is_empty() {
            report.problems.push(format!(
                "table {table}: has no primary key; pgds keys events by it: add one (ALTER TABLE {quoted} ADD PRIMARY KEY (…))"
            ));
        }
        if let Route::Column(c) = &t.route
            && !info.has_column(c)
        {
            report.problems.push(format!(
                "table {table}: routing column {c:?} does not exist (tables[].route.column)"
            ));
        }
        for c in &t.exclude_columns {
            if !info.has_column(c) {
                report.problems.push(format!(
                    "table {table}: excluded column {c:?} does not exist (tables[].exclude_columns); remove it from the list"
                ));
            }
        }
    }
    if let Some(u) = cfg.users.as_ref().filter(|u| u.table == *table)
        && !info.has_column(&u.column)
    {
        report.problems.push(format!(
            "table {table}: user id column {:?} does not exist (users.column)",
            u.column
        ));
    }
    let needs = identity_needs(cfg, table, info);
    if info.replica_identity == 'n' {
        report.problems.push(format!(
            "table {table}: REPLICA IDENTITY NOTHING publishes no updates or deletes: ALTER TABLE {quoted} REPLICA IDENTITY FULL"
        ));
    } else if !needs.routing.is_empty() {
        let msg = format!(
            "table {table}: column {} is not part of the replica identity, so an UPDATE or DELETE does not say who had the row before: ALTER TABLE {quoted} REPLICA IDENTITY FULL",
            needs.routing.join(", ")
        );
        if cfg.postgres.set_replica_identity_full {
            report.notes.push(format!(
                "{msg} (pgds will do this: postgres.set_replica_identity_full)"
            ));
        } else {
            report.problems.push(format!(
                "{msg}, or set postgres.set_replica_identity_full = true"
            ));
        }
    } else if !needs.toast.is_empty() {
        let msg = format!(
            "table {table}: TOASTable column {} is not part of the replica identity, so an UPDATE that leaves a large value unchanged does not send it: the event omits it and lists it in headers.unchanged (a client keeps its value)",
            needs.toast.join(", ")
        );
        report.notes.push(if cfg.postgres.full_identity_for_toast {
            format!("{msg}; pgds will set REPLICA IDENTITY FULL (postgres.full_identity_for_toast)")
        } else {
            format!(
                "{msg}; to always send whole rows: ALTER TABLE {quoted} REPLICA IDENTITY FULL, or set postgres.full_identity_for_toast = true"
            )
        })
    }
}

/// Tables whose replica identity pgds must set to FULL: for routing with
/// `postgres.set_replica_identity_full`, for TOAST with `postgres.full_identity_for_toast`.
pub async fn tables_needing_full_identity(
    cfg: &Config,
    client: &Client,
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for table in replicated_tables(cfg) {
        let Some(info) = catalog::table_info(client, &table).await? else {
            continue;
        };
        let needs = identity_needs(cfg, &table, &info);
        let routing = !needs.routing.is_empty() || info.replica_identity == 'n';
        if (routing && cfg.postgres.set_replica_identity_full)
            || (!needs.toast.is_empty() && cfg.postgres.full_identity_for_toast)
        {
            out.push(table);
        }
    }
    Ok(out)
}
