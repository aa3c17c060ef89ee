//! `pgds check`: verify that the database can serve the configuration, and say how to fix each
//! problem. `pgds run` performs the same checks before it starts.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::config::{Config, FilterTest, Route, TableName, routing_column};
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

/// Every table pgds replicates: the configured ones, the users table and the membership tables.
pub fn replicated_tables(cfg: &Config) -> Vec<TableName> {
    let mut tables: Vec<TableName> = cfg.tables.iter().map(|t| t.table.clone()).collect();
    let others = cfg
        .users
        .iter()
        .map(|u| &u.table)
        .chain(cfg.tables.iter().filter_map(|t| match &t.route {
            Route::Via(v) => Some(&v.table),
            _ => None,
        }));
    for t in others {
        if !tables.contains(t) {
            tables.push(t.clone());
        }
    }
    tables
}

/// The columns of `table` an UPDATE or DELETE must carry in its old row, with the config key
/// that names each: routing, scope and filter columns, the user id column of `[users]`, the scope
/// and user columns of a membership table.
fn decisive_columns(cfg: &Config, table: &TableName) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, t) in cfg.tables.iter().enumerate() {
        if t.table == *table {
            if let Some(c) = routing_column(&t.route) {
                let key = match &t.route {
                    Route::Via(_) => "route.scope",
                    _ => "route.column",
                };
                out.push((c.clone(), format!("tables[{i}].{key}")));
            }
            if let Some(f) = &t.filter {
                out.push((f.column.clone(), format!("tables[{i}].filter.column")));
            }
        }
        if let Route::Via(v) = &t.route
            && v.table == *table
        {
            out.push((
                v.member_scope.clone(),
                format!("tables[{i}].route.member_scope"),
            ));
            out.push((v.user.clone(), format!("tables[{i}].route.user")));
        }
    }
    if let Some(u) = cfg.users.as_ref().filter(|u| u.table == *table) {
        out.push((u.column.clone(), "users.column".to_owned()));
    }
    out
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
            "role {role:?} may not stream replication: ALTER ROLE {role} REPLICATION (on Amazon RDS or Aurora: GRANT rds_replication TO {role}), or use a role that has it"
        ));
    }
    let schema = catalog::schema_access(client).await?;
    if !schema.is_ok() {
        report.problems.push(if schema.exists {
            format!(
                "role {role:?} may not create pgds's tables in schema pgds: GRANT USAGE, CREATE ON SCHEMA pgds TO {role}"
            )
        } else {
            format!(
                "role {role:?} may not create schema pgds (for pgds's checkpoint tables) in database {:?}: GRANT CREATE ON DATABASE {} TO {role}, or create the schema beforehand (CREATE SCHEMA pgds; GRANT USAGE, CREATE ON SCHEMA pgds TO {role})",
                schema.database,
                catalog::quote_ident(&schema.database),
            )
        });
    }
    if !schema.create_on_database
        && !catalog::publication_exists(client, &cfg.postgres.publication).await?
    {
        report.problems.push(format!(
            "publication {:?} does not exist and role {role:?} may not create it (CREATE PUBLICATION needs CREATE on database {:?}): GRANT CREATE ON DATABASE {} TO {role}, or have the tables' owner create it beforehand (CREATE PUBLICATION {} FOR TABLE …)",
            cfg.postgres.publication,
            schema.database,
            catalog::quote_ident(&schema.database),
            catalog::quote_ident(&cfg.postgres.publication),
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
    check_types(cfg, client, &mut report).await?;

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

/// Why a table may need `REPLICA IDENTITY FULL`: the columns that decide who sees a row, which
/// an UPDATE or DELETE must carry in its old row, and published TOASTable columns it may leave
/// out.
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
    for (c, _) in decisive_columns(cfg, table) {
        if info.has_column(&c) && !info.identity_covers(&c) && !needs.routing.contains(&c) {
            needs.routing.push(c);
        }
    }
    let configured = cfg.table(&table.schema, &table.name);
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
        for c in &t.exclude_columns {
            if !info.has_column(c) {
                report.problems.push(format!(
                    "table {table}: excluded column {c:?} does not exist (tables[].exclude_columns); remove it from the list"
                ));
            }
        }
    }
    for (c, key) in decisive_columns(cfg, table) {
        if !info.has_column(&c) {
            report.problems.push(format!(
                "table {table}: column {c:?} does not exist ({key})"
            ));
        }
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

/// The join of each membership route compares the scope columns by their text: they must be of
/// the same kind (both numbers, both strings…), not arrays; a user id column is not an array; a
/// filter without a test needs a boolean column.
async fn check_types(
    cfg: &Config,
    client: &Client,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let mut cache: HashMap<TableName, HashMap<String, catalog::ColumnType>> = HashMap::new();
    for t in cfg.tables.iter() {
        for name in std::iter::once(&t.table).chain(match &t.route {
            Route::Via(v) => Some(&v.table),
            _ => None,
        }) {
            if !cache.contains_key(name) {
                cache.insert(name.clone(), catalog::column_types(client, name).await?);
            }
        }
    }
    for (i, t) in cfg.tables.iter().enumerate() {
        let ty = |table: &TableName, c: &str| cache.get(table).and_then(|m| m.get(c));
        if let Route::Via(v) = &t.route
            && let (Some(a), Some(b)) = (ty(&t.table, &v.scope), ty(&v.table, &v.member_scope))
        {
            if !joinable(a) || !joinable(b) || a.category != b.category {
                report.problems.push(format!(
                    "tables[{i}].route: {}.{} ({}) and {}.{} ({}) cannot be joined: the scope columns must be of the same kind, integers, numeric, text, uuid, enum or boolean (not arrays, floats or timestamps, whose text differs between replication and queries)",
                    t.table, v.scope, a.name, v.table, v.member_scope, b.name
                ));
            }
            if let Some(u) = ty(&v.table, &v.user)
                && u.category == 'A'
            {
                report.problems.push(format!(
                    "tables[{i}].route.user: {}.{} is an array ({}); a membership row names one user",
                    v.table, v.user, u.name
                ));
            }
        }
        if let Some(f) = &t.filter
            && f.test == FilterTest::True
            && let Some(c) = ty(&t.table, &f.column)
            && c.category != 'B'
        {
            report.problems.push(format!(
                "tables[{i}].filter: column {:?} is {}, not boolean; give a test (equals, in, not_null)",
                f.column, c.name
            ));
        }
    }
    Ok(())
}

/// Whether a scope column compares the same as replicated JSON and as text in SQL.
fn joinable(t: &catalog::ColumnType) -> bool {
    match t.category {
        'S' | 'U' | 'E' | 'B' => true,
        'N' => !matches!(t.name.as_str(), "real" | "double precision" | "money"),
        _ => false,
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
