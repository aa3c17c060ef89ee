//! Catalog queries on the regular connection: what `pgds check` verifies and what the pipeline
//! needs at start-up (primary keys, user types, the user set).

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::config::TableName;
use crate::source::value::{TypeDesc, TypeRegistry};

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub owned: bool,
    pub can_select: bool,
    /// Column names in attribute order.
    pub columns: Vec<String>,
    pub primary_key: Vec<String>,
    /// The columns an UPDATE or DELETE carries in its old row.
    pub identity: Vec<String>,
    /// Columns whose values Postgres may store out of line (TOAST): an UPDATE that leaves them
    /// unchanged does not send them unless the old row carries them.
    pub toastable: Vec<String>,
}

impl TableInfo {
    pub fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }

    /// Whether the old row of an UPDATE or DELETE carries `column`.
    pub fn identity_covers(&self, column: &str) -> bool {
        self.replica_identity == 'f' || self.identity.iter().any(|c| c == column)
    }
}

/// Look a table up; `None` when it does not exist.
pub async fn table_info(
    client: &Client,
    table: &TableName,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, pg_has_role(c.relowner, 'USAGE'), \
                    has_table_privilege(c.oid, 'SELECT') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let ident: String = row.get(1);
    let (mut columns, mut toastable) = (Vec::new(), Vec::new());
    for r in client
        .query(
            "SELECT attname::text, attstorage <> 'p' FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?
    {
        let name: String = r.get(0);
        if r.get::<_, bool>(1) {
            toastable.push(name.clone());
        }
        columns.push(name);
    }
    let index_columns = |flag: &'static str| async move {
        let sql = format!(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.{flag} ORDER BY k.ord"
        );
        client.query(&sql, &[&oid]).await.map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        })
    };
    let primary_key = index_columns("indisprimary").await?;
    let replica_identity = ident.chars().next().unwrap_or('d');
    let identity = match replica_identity {
        'd' => primary_key.clone(),
        'i' => index_columns("indisreplident").await?,
        _ => Vec::new(),
    };
    Ok(Some(TableInfo {
        oid,
        replica_identity,
        owned: row.get(2),
        can_select: row.get(3),
        columns,
        primary_key,
        identity,
        toastable,
    }))
}

/// A column's type as `pgds check` compares them: its name and its category (`pg_type.typcategory`
/// of the type, or of a domain's base type: `N` numeric, `S` string, `B` boolean, `A` array…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    pub name: String,
    pub category: char,
}

/// The type of each column of `table` (by column name).
pub async fn column_types(
    client: &Client,
    table: &TableName,
) -> Result<HashMap<String, ColumnType>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), b.typcategory::text \
             FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let category: String = r.get(2);
            (
                r.get(0),
                ColumnType {
                    name: r.get(1),
                    category: category.chars().next().unwrap_or('X'),
                },
            )
        })
        .collect())
}

/// A server setting (`SHOW`).
pub async fn setting(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?;
    Ok(row.get(0))
}

/// The connected role's name, and whether it may stream replication: a superuser, a role with
/// the REPLICATION attribute, or a member of `rds_replication` where that role exists (Amazon
/// RDS and Aurora give users no REPLICATION attribute; membership of that role stands for it).
/// The role is looked up in `pg_roles` first: `pg_has_role` errors on a name that does not exist.
pub async fn can_replicate(client: &Client) -> Result<(String, bool), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT r.rolname::text, r.rolsuper OR r.rolreplication OR COALESCE( \
                 (SELECT pg_has_role(r.oid, g.oid, 'MEMBER') FROM pg_roles g \
                  WHERE g.rolname = 'rds_replication'), false) \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Whether the connected role can hold pgds's own tables (`migrations/`) in schema `pgds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaAccess {
    pub database: String,
    /// Schema `pgds` exists.
    pub exists: bool,
    /// The role has USAGE and CREATE on schema `pgds` (false when it does not exist).
    pub usable: bool,
    /// The role has CREATE on the database: it may create schema `pgds` (and publications).
    pub create_on_database: bool,
}

impl SchemaAccess {
    /// The migrations can run: the schema is usable, or missing and the role may create it.
    pub fn is_ok(&self) -> bool {
        if self.exists {
            self.usable
        } else {
            self.create_on_database
        }
    }
}

/// Whether a publication named `name` exists.
pub async fn publication_exists(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn schema_access(client: &Client) -> Result<SchemaAccess, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_database()::text, n.oid IS NOT NULL, \
                    COALESCE(has_schema_privilege(n.oid, 'USAGE') \
                             AND has_schema_privilege(n.oid, 'CREATE'), false), \
                    has_database_privilege(current_database(), 'CREATE') \
             FROM (SELECT 1) AS one LEFT JOIN pg_namespace n ON n.nspname = 'pgds'",
            &[],
        )
        .await?;
    Ok(SchemaAccess {
        database: row.get(0),
        exists: row.get(1),
        usable: row.get(2),
        create_on_database: row.get(3),
    })
}

/// Register the user-defined types (enums, domains, arrays of them…) with the registry.
/// Built-in types (OIDs below 16384) are already known to it.
pub async fn load_types(
    client: &Client,
    registry: &mut TypeRegistry,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT oid, typname::text, typtype::text, typelem, typbasetype, typdelim::text \
             FROM pg_type WHERE oid >= 16384",
            &[],
        )
        .await?;
    // The fields of composite types made with CREATE TYPE … AS (not the row types of tables).
    let mut fields: HashMap<u32, Vec<(String, u32)>> = HashMap::new();
    for r in client
        .query(
            "SELECT t.oid, a.attname::text, a.atttypid FROM pg_type t \
             JOIN pg_class c ON c.oid = t.typrelid AND c.relkind = 'c' \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE t.oid >= 16384 ORDER BY t.oid, a.attnum",
            &[],
        )
        .await?
    {
        fields
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2)));
    }
    for r in rows {
        let byte = |i: usize| r.get::<_, String>(i).bytes().next().unwrap_or(b',');
        let oid: u32 = r.get(0);
        registry.insert(
            oid,
            TypeDesc {
                name: r.get(1),
                typtype: byte(2),
                elem: r.get(3),
                base: r.get(4),
                delim: byte(5),
                fields: fields.remove(&oid).unwrap_or_default(),
            },
        );
    }
    Ok(())
}

/// Every user id in the users table, as text.
pub async fn load_users(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
    column: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {}::text FROM {}.{} WHERE {} IS NOT NULL",
        quote_ident(column),
        quote_ident(&table.schema),
        quote_ident(&table.name),
        quote_ident(column)
    );
    let rows = client.query(&sql, &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Quote an identifier for SQL (names come from validated config, still never trusted).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_table(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}
