//! Configuration: TOML file plus `PGDS__SECTION__KEY` environment overrides, deserialized into
//! raw serde types and then validated, all at once, into [`Config`].
//!
//! Validation is pure (no I/O) and reports every problem it finds, each naming its dotted key
//! (`tables[1].route`). What needs the database (tables and columns exist, replica identity,
//! `wal_level`) is checked later by `crate::check`. Secrets (the Postgres password, the streams
//! token) live in [`SecretString`]s: `Config` is not `Serialize` and its `Debug` redacts them.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::writer::PathTemplate;

/// Environment variables with this prefix override file keys: `PGDS__POSTGRES__URL`.
pub const ENV_PREFIX: &str = "PGDS";
const ENV_SEPARATOR: &str = "__";

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub streams: StreamsConfig,
    pub batch: BatchConfig,
    pub users: Option<UsersConfig>,
    pub tables: Vec<TableConfig>,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
}

/// The operations endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Where to listen; `None` disables the endpoint.
    pub listen: Option<std::net::SocketAddr>,
    /// `/readyz` fails when the oldest commit not yet durable is older than this.
    pub ready_max_lag: Duration,
}

#[derive(Debug)]
pub struct PostgresConfig {
    pub conn: ConnParams,
    pub slot: String,
    pub publication: String,
    /// Let pgds run `ALTER TABLE … REPLICA IDENTITY FULL` on configured tables that need it.
    pub set_replica_identity_full: bool,
    /// Also set it on tables whose TOASTable columns are outside the replica identity, so an
    /// UPDATE always carries whole rows (no `headers.unchanged`).
    pub full_identity_for_toast: bool,
    /// Copy the existing rows when pgds creates the slot.
    pub initial_snapshot: bool,
}

/// Where and how to connect to Postgres, parsed from a `postgres://` URL.
pub struct ConnParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<SecretString>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

impl ConnParams {
    /// `user@host:port/db`, without the password: safe for logs.
    pub fn display(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    pub fn password(&self) -> &str {
        self.password.as_ref().map_or("", |p| p.expose_secret())
    }
}

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug)]
pub struct StreamsConfig {
    pub base_url: url::Url,
    pub path: PathTemplate,
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_bytes: usize,
    pub linger: Duration,
    pub linger_under_load: Duration,
    pub max_in_flight: usize,
    pub max_buffered_bytes: usize,
    pub request_timeout: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone)]
pub struct UsersConfig {
    pub table: TableName,
    pub column: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct TableConfig {
    pub table: TableName,
    /// The State Protocol `type` of the table's events.
    pub alias: String,
    pub route: Route,
    pub exclude_columns: Vec<String>,
    /// Only rows that match are published; `None`: every row.
    pub filter: Option<RowFilter>,
}

/// Who receives a table's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The user id in this column (scalar), or each user id in it (array column).
    Column(String),
    /// Every user of `[users]`: shared reference data.
    All,
    /// Every user that a membership table lists for the row's scope value.
    Via(ViaRoute),
}

/// `route = { via = "public.project_members", scope = "project_id", user = "user_id" }`: a row
/// goes to every `user` of the rows of `table` whose `member_scope` equals the row's `scope`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ViaRoute {
    /// The membership table.
    pub table: TableName,
    /// The scope column of the routed table.
    pub scope: String,
    /// The scope column of the membership table (default: the same name as `scope`).
    pub member_scope: String,
    /// The user id column of the membership table.
    pub user: String,
}

impl ViaRoute {
    /// The membership index this route reads: the same for every table routed through the same
    /// membership table and columns.
    pub fn membership(&self) -> Membership {
        Membership {
            table: self.table.clone(),
            scope: self.member_scope.clone(),
            user: self.user.clone(),
        }
    }
}

/// A membership table and its scope and user columns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Membership {
    pub table: TableName,
    pub scope: String,
    pub user: String,
}

/// `filter = { column = "c", … }`: which rows of a table are published. Values compare by their
/// text (numbers in decimal, booleans as `true` / `false`), as Postgres prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFilter {
    pub column: String,
    pub test: FilterTest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterTest {
    /// `equals = v`
    Equals(String),
    /// `in = [v, …]`
    In(Vec<String>),
    /// `not_null = true`
    NotNull,
    /// No test given: a boolean column that must be true.
    True,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// The configuration could not be loaded: one line per problem, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

// ---- raw, as deserialized ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    postgres: RawPostgres,
    streams: RawStreams,
    #[serde(default)]
    batch: RawBatch,
    users: Option<RawUsers>,
    #[serde(default)]
    tables: Vec<RawTable>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: String,
    ready_max_lag_secs: u64,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: String::new(),
            ready_max_lag_secs: 60,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: SecretString,
    #[serde(default = "default_slot")]
    slot: String,
    #[serde(default = "default_slot")]
    publication: String,
    #[serde(default)]
    set_replica_identity_full: bool,
    #[serde(default)]
    full_identity_for_toast: bool,
    #[serde(default = "yes")]
    initial_snapshot: bool,
}

fn yes() -> bool {
    true
}

fn default_slot() -> String {
    "pgds".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreams {
    base_url: String,
    #[serde(default = "default_path")]
    path: String,
    token: Option<SecretString>,
    #[serde(default = "default_max_user_id_len")]
    max_user_id_len: usize,
}

fn default_path() -> String {
    "/v1/stream/user/{user_id}/data".to_owned()
}

fn default_max_user_id_len() -> usize {
    256
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBatch {
    max_bytes: usize,
    linger_ms: u64,
    linger_under_load_ms: u64,
    max_in_flight: usize,
    max_buffered_bytes: usize,
    request_timeout_ms: u64,
    max_backoff_ms: u64,
}

impl Default for RawBatch {
    fn default() -> Self {
        RawBatch {
            max_bytes: 1 << 20,
            linger_ms: 0,
            linger_under_load_ms: 100,
            max_in_flight: 256,
            max_buffered_bytes: 64 << 20,
            request_timeout_ms: 30_000,
            max_backoff_ms: 30_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    table: String,
    column: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: String,
    alias: Option<String>,
    route: RawRoute,
    #[serde(default)]
    exclude_columns: Vec<String>,
    filter: Option<RawFilter>,
}

/// Exactly one of `column`, `all`, `via` must be set; an unknown field is an unknown route kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    column: Option<String>,
    all: Option<bool>,
    via: Option<String>,
    scope: Option<String>,
    member_scope: Option<String>,
    user: Option<String>,
}

/// At most one of `equals`, `in`, `not_null`; none: `column` is a boolean that must be true.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    column: String,
    equals: Option<FilterValue>,
    #[serde(rename = "in")]
    any_of: Option<Vec<FilterValue>>,
    not_null: Option<bool>,
}

/// A filter value: a string, an integer or a boolean, compared by its text.
#[derive(Deserialize)]
#[serde(untagged)]
enum FilterValue {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl FilterValue {
    fn text(self) -> String {
        match self {
            FilterValue::Bool(b) => b.to_string(),
            FilterValue::Int(i) => i.to_string(),
            FilterValue::Text(s) => s,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "human".to_owned(),
        }
    }
}

// ---- loading ----

impl Config {
    /// Load `path` and the process environment, then validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`], with the environment given explicitly (`None`: the process's).
    pub fn load_with_env(
        path: &Path,
        env: Option<config::Map<String, String>>,
    ) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::one(format!(
                "config file {} does not exist or is not a file",
                path.display()
            )));
        }
        let source = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator(ENV_SEPARATOR)
                    .separator(ENV_SEPARATOR)
                    .source(env),
            )
            .build()
            .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
        let raw: RawConfig = source
            .try_deserialize()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        raw.validate()
    }

    /// Parse TOML text (no environment): for tests and `pgds check`'s unit tests.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let source = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let raw: RawConfig = source
            .try_deserialize()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        raw.validate()
    }

    /// The configured table whose `schema.name` matches.
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableConfig> {
        self.tables
            .iter()
            .find(|t| t.table.schema == schema && t.table.name == name)
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();

        let conn = parse_postgres_url(self.postgres.url.expose_secret())
            .map_err(|e| problems.push(format!("postgres.url: {e}")))
            .ok();
        for (key, value) in [
            ("postgres.slot", &self.postgres.slot),
            ("postgres.publication", &self.postgres.publication),
        ] {
            if !is_identifier(value) {
                problems.push(format!(
                    "{key}: {value:?} must be 1 to 63 characters of a-z, 0-9 and _, starting with a letter or _"
                ));
            }
        }

        let base_url = match url::Url::parse(&self.streams.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Some(u),
            Ok(u) => {
                problems.push(format!(
                    "streams.base_url: {:?} must be an http:// or https:// URL with a host",
                    u.as_str()
                ));
                None
            }
            Err(e) => {
                problems.push(format!(
                    "streams.base_url: {:?} is not a URL: {e}",
                    self.streams.base_url
                ));
                None
            }
        };
        if let Some(u) = &base_url
            && (u.password().is_some() || !u.username().is_empty())
        {
            problems
                .push("streams.base_url: must not carry credentials; use streams.token".to_owned());
        }
        let path = PathTemplate::parse(&self.streams.path, self.streams.max_user_id_len)
            .map_err(|e| problems.push(format!("streams.path: {e}")))
            .ok();

        let b = &self.batch;
        for (key, value) in [
            ("batch.max_bytes", b.max_bytes as u64),
            ("batch.max_in_flight", b.max_in_flight as u64),
            ("batch.max_buffered_bytes", b.max_buffered_bytes as u64),
            ("batch.request_timeout_ms", b.request_timeout_ms),
            ("batch.max_backoff_ms", b.max_backoff_ms),
        ] {
            if value == 0 {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if b.max_buffered_bytes < b.max_bytes {
            problems.push("batch.max_buffered_bytes: must be at least batch.max_bytes".to_owned());
        }

        let users = self.users.and_then(|u| {
            let table = parse_table_name(&u.table)
                .map_err(|e| problems.push(format!("users.table: {e}")))
                .ok()?;
            if u.column.is_empty() {
                problems.push("users.column: must not be empty".to_owned());
            }
            Some(UsersConfig {
                table,
                column: u.column,
            })
        });

        if self.tables.is_empty() {
            problems.push("tables: at least one [[tables]] entry is required".to_owned());
        }
        let mut seen = HashSet::new();
        let mut aliases = HashSet::new();
        let mut tables = Vec::new();
        for (i, t) in self.tables.into_iter().enumerate() {
            let key = format!("tables[{i}]");
            let Ok(table) =
                parse_table_name(&t.name).map_err(|e| problems.push(format!("{key}.name: {e}")))
            else {
                continue;
            };
            if !seen.insert(table.clone()) {
                problems.push(format!("{key}.name: table {table} is listed twice"));
            }
            let alias = t.alias.unwrap_or_else(|| table.name.clone());
            if alias.is_empty() {
                problems.push(format!("{key}.alias: must not be empty"));
            } else if !aliases.insert(alias.clone()) {
                problems.push(format!(
                    "{key}.alias: event type {alias:?} is already used by another table"
                ));
            }
            let route = validate_route(&key, t.route, users.is_some(), &mut problems);
            if let Some(c) = route.as_ref().and_then(routing_column)
                && t.exclude_columns.iter().any(|e| e == c)
            {
                problems.push(format!(
                    "{key}.exclude_columns: the routing column {c:?} cannot be excluded"
                ));
            }
            let filter = t
                .filter
                .and_then(|f| validate_filter(&key, f, &mut problems));
            let mut excluded = HashSet::new();
            for c in &t.exclude_columns {
                if !excluded.insert(c) {
                    problems.push(format!("{key}.exclude_columns: {c:?} is listed twice"));
                }
            }
            if let Some(route) = route {
                tables.push(TableConfig {
                    table,
                    alias,
                    route,
                    exclude_columns: t.exclude_columns,
                    filter,
                });
            }
        }

        let format = match self.log.format.as_str() {
            "human" => Some(LogFormat::Human),
            "json" => Some(LogFormat::Json),
            other => {
                problems.push(format!(
                    "log.format: {other:?} is not one of \"human\", \"json\""
                ));
                None
            }
        };

        let metrics_listen = match self.metrics.listen.as_str() {
            "" => Some(None),
            addr => addr
                .parse::<std::net::SocketAddr>()
                .map(Some)
                .map_err(|_| {
                    problems.push(format!(
                        "metrics.listen: {addr:?} is not an address like \"127.0.0.1:9187\" (empty disables the endpoint)"
                    ))
                })
                .ok(),
        };

        match (conn, base_url, path, format, metrics_listen) {
            (Some(conn), Some(base_url), Some(path), Some(format), Some(listen))
                if problems.is_empty() =>
            {
                Ok(Config {
                    postgres: PostgresConfig {
                        conn,
                        slot: self.postgres.slot,
                        publication: self.postgres.publication,
                        set_replica_identity_full: self.postgres.set_replica_identity_full,
                        full_identity_for_toast: self.postgres.full_identity_for_toast,
                        initial_snapshot: self.postgres.initial_snapshot,
                    },
                    streams: StreamsConfig {
                        base_url,
                        path,
                        token: self.streams.token,
                    },
                    batch: BatchConfig {
                        max_bytes: b.max_bytes,
                        linger: Duration::from_millis(b.linger_ms),
                        linger_under_load: Duration::from_millis(b.linger_under_load_ms),
                        max_in_flight: b.max_in_flight,
                        max_buffered_bytes: b.max_buffered_bytes,
                        request_timeout: Duration::from_millis(b.request_timeout_ms),
                        max_backoff: Duration::from_millis(b.max_backoff_ms),
                    },
                    users,
                    tables,
                    log: LogConfig { format },
                    metrics: MetricsConfig {
                        listen,
                        ready_max_lag: Duration::from_secs(self.metrics.ready_max_lag_secs),
                    },
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }
}

/// The column of the routed table that decides who receives a row.
pub fn routing_column(route: &Route) -> Option<&String> {
    match route {
        Route::Column(c) => Some(c),
        Route::Via(v) => Some(&v.scope),
        Route::All => None,
    }
}

fn validate_route(
    key: &str,
    r: RawRoute,
    have_users: bool,
    problems: &mut Vec<String>,
) -> Option<Route> {
    let via_parts = r.scope.is_some() || r.member_scope.is_some() || r.user.is_some();
    match (r.column, r.all, r.via) {
        (Some(_), None, None) | (None, Some(_), None) if via_parts => {
            problems.push(format!(
                "{key}.route: `scope`, `member_scope` and `user` only go with `via = \"schema.table\"`"
            ));
            None
        }
        (Some(column), None, None) if !column.is_empty() => Some(Route::Column(column)),
        (Some(_), None, None) => {
            problems.push(format!("{key}.route.column: must not be empty"));
            None
        }
        (None, Some(true), None) => {
            if !have_users {
                problems.push(format!(
                    "{key}.route: `all = true` needs a [users] section naming the table of users"
                ));
            }
            Some(Route::All)
        }
        (None, Some(false), None) => {
            problems.push(format!(
                "{key}.route.all: only `all = true` is meaningful; use `column = \"…\"` to route by owner"
            ));
            None
        }
        (None, None, Some(via)) => {
            let table = parse_table_name(&via)
                .map_err(|e| problems.push(format!("{key}.route.via: {e}")))
                .ok();
            let mut need = |name: &str, value: Option<String>| match value {
                Some(v) if !v.is_empty() => Some(v),
                _ => {
                    problems.push(format!(
                        "{key}.route.{name}: required with `via`, the name of a column"
                    ));
                    None
                }
            };
            let scope = need("scope", r.scope);
            let user = need("user", r.user);
            let member_scope = match r.member_scope {
                Some(m) => need("member_scope", Some(m)),
                None => scope.clone(),
            };
            Some(Route::Via(ViaRoute {
                table: table?,
                scope: scope?,
                member_scope: member_scope?,
                user: user?,
            }))
        }
        _ => {
            problems.push(format!(
                "{key}.route: set exactly one of `column = \"…\"`, `all = true` or `via = \"schema.table\"`"
            ));
            None
        }
    }
}

fn validate_filter(key: &str, f: RawFilter, problems: &mut Vec<String>) -> Option<RowFilter> {
    if f.column.is_empty() {
        problems.push(format!("{key}.filter.column: must not be empty"));
        return None;
    }
    let test = match (f.equals, f.any_of, f.not_null) {
        (None, None, None) => FilterTest::True,
        (Some(v), None, None) => FilterTest::Equals(v.text()),
        (None, Some(values), None) if !values.is_empty() => {
            FilterTest::In(values.into_iter().map(FilterValue::text).collect())
        }
        (None, Some(_), None) => {
            problems.push(format!("{key}.filter.in: must list at least one value"));
            return None;
        }
        (None, None, Some(true)) => FilterTest::NotNull,
        (None, None, Some(false)) => {
            problems.push(format!(
                "{key}.filter.not_null: only `not_null = true` is meaningful"
            ));
            return None;
        }
        _ => {
            problems.push(format!(
                "{key}.filter: set at most one of `equals`, `in`, `not_null` (none: a boolean column that must be true)"
            ));
            return None;
        }
    };
    Some(RowFilter {
        column: f.column,
        test,
    })
}

/// Slot and publication names go into replication commands unquoted.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// `schema.table` or `table` (schema `public`); names are taken literally (case-sensitive).
fn parse_table_name(s: &str) -> Result<TableName, String> {
    let (schema, name) = s.split_once('.').unwrap_or(("public", s));
    if schema.is_empty() || name.is_empty() || name.contains('.') {
        return Err(format!(
            "{s:?} is not a table name; expected \"schema.table\" or \"table\""
        ));
    }
    Ok(TableName {
        schema: schema.to_owned(),
        name: name.to_owned(),
    })
}

/// Parse `postgres://user:password@host:port/dbname?sslmode=…&sslrootcert=…`. Messages never
/// contain the URL itself, which may hold the password.
fn parse_postgres_url(text: &str) -> Result<ConnParams, String> {
    let url = url::Url::parse(text).map_err(|e| {
        format!("not a URL ({e}); expected postgres://user:password@host:port/dbname")
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme {:?} is not postgres:// or postgresql://",
            url.scheme()
        ));
    }
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| "contains percent-encoded bytes that are not UTF-8".to_owned())
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("has no host")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let user = decode(url.username())?;
    if user.is_empty() {
        return Err("has no user name (postgres://USER@host/db)".to_owned());
    }
    let password = url
        .password()
        .map(decode)
        .transpose()?
        .map(SecretString::from);
    let dbname = decode(url.path().trim_start_matches('/'))?;
    if dbname.is_empty() {
        return Err("has no database name (postgres://user@host/DBNAME)".to_owned());
    }
    let mut sslmode = SslMode::Prefer;
    let mut sslrootcert = None;
    for (k, v) in url.query_pairs() {
        match &*k {
            "sslmode" => {
                sslmode = match &*v {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => sslrootcert = Some(PathBuf::from(&*v)),
            other => {
                return Err(format!(
                    "parameter {other:?} is not supported (supported: sslmode, sslrootcert)"
                ));
            }
        }
    }
    Ok(ConnParams {
        host,
        port: url.port().unwrap_or(5432),
        user,
        password,
        dbname,
        sslmode,
        sslrootcert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[postgres]
url = "postgres://pgds:s3cret%40pw@db.example:6543/app?sslmode=require"
[streams]
base_url = "http://localhost:4437"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

    fn problems(toml: &str) -> Vec<String> {
        match Config::from_toml(toml) {
            Ok(_) => panic!("expected an error for:\n{toml}"),
            Err(e) => e.problems,
        }
    }

    fn assert_problem(toml: &str, needle: &str) {
        let p = problems(toml);
        assert!(
            p.iter().any(|p| p.contains(needle)),
            "no problem mentions {needle:?}: {p:?}"
        );
        assert!(
            !p.iter().any(|p| p.contains("s3cret")),
            "secret leaked: {p:?}"
        );
    }

    #[test]
    fn loads_the_minimal_config_with_defaults() {
        let c = Config::from_toml(BASE).unwrap();
        assert_eq!(c.postgres.conn.host, "db.example");
        assert_eq!(c.postgres.conn.port, 6543);
        assert_eq!(c.postgres.conn.user, "pgds");
        assert_eq!(c.postgres.conn.password(), "s3cret@pw");
        assert_eq!(c.postgres.conn.dbname, "app");
        assert_eq!(c.postgres.conn.sslmode, SslMode::Require);
        assert_eq!(c.postgres.slot, "pgds");
        assert_eq!(c.tables[0].alias, "todos");
        assert_eq!(c.tables[0].route, Route::Column("owner_id".into()));
        assert_eq!(c.batch.max_bytes, 1 << 20);
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn the_demo_config_is_valid() {
        let text = include_str!("../examples/demo.toml");
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.tables.len(), 3);
        assert_eq!(c.tables[2].alias, "news");
        assert_eq!(c.tables[2].route, Route::All);
    }

    #[test]
    fn the_docker_config_is_valid_and_serves_the_compose_health_check() {
        let c = Config::from_toml(include_str!("../examples/docker.toml")).unwrap();
        assert_eq!(c.tables.len(), 3);
        let listen = c.metrics.listen.expect("metrics.listen is set");
        let compose = include_str!("../docker-compose.yml");
        assert!(
            compose.contains(&format!("http://127.0.0.1:{}/readyz", listen.port())),
            "docker-compose.yml probes the port of examples/docker.toml's metrics.listen"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        assert_problem(&format!("{BASE}\n[batch]\nmax_byte = 3\n"), "max_byte");
        assert_problem(
            &BASE.replace("[streams]", "[streams]\ncolour = 1"),
            "colour",
        );
        assert_problem(&format!("{BASE}\n[extra]\na = 1\n"), "extra");
    }

    #[test]
    fn unknown_route_kind_is_refused() {
        assert_problem(
            &BASE.replace("{ column = \"owner_id\" }", "{ via = \"x\" }"),
            "via",
        );
        assert_problem(
            &BASE.replace(
                "{ column = \"owner_id\" }",
                "{ column = \"a\", all = true }",
            ),
            "tables[0].route",
        );
    }

    #[test]
    fn bad_urls_are_refused_without_leaking_the_password() {
        assert_problem(
            &BASE.replace("postgres://pgds", "mysql://pgds"),
            "postgres.url",
        );
        assert_problem(&BASE.replace("sslmode=require", "sslmode=maybe"), "sslmode");
        assert_problem(&BASE.replace("/app?", "/?"), "database name");
        assert_problem(
            &BASE.replace("http://localhost:4437", "localhost:4437"),
            "streams.base_url",
        );
        assert_problem(
            &BASE.replace("http://localhost:4437", "ftp://x"),
            "streams.base_url",
        );
    }

    #[test]
    fn metrics_listen_must_be_an_address() {
        assert_problem(
            &format!("{BASE}\n[metrics]\nlisten = \"localhost\"\n"),
            "metrics.listen",
        );
        let c = Config::from_toml(&format!("{BASE}\n[metrics]\nlisten = \"127.0.0.1:9187\"\n"))
            .unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(Config::from_toml(BASE).unwrap().metrics.listen, None);
    }

    #[test]
    fn path_template_needs_user_id() {
        assert_problem(
            &BASE.replace("[streams]", "[streams]\npath = \"/v1/stream/all\""),
            "streams.path",
        );
    }

    #[test]
    fn duplicate_tables_and_aliases_are_refused() {
        let twice = format!("{BASE}\n[[tables]]\nname = \"todos\"\nroute = {{ column = \"x\" }}\n");
        assert_problem(&twice, "listed twice");
        let alias =
            format!("{BASE}\n[[tables]]\nname = \"other.todos\"\nroute = {{ column = \"x\" }}\n");
        assert_problem(&alias, "tables[1].alias");
    }

    #[test]
    fn membership_routes_and_filters_load() {
        let text = BASE.replace(
            "{ column = \"owner_id\" }",
            "{ via = \"public.project_members\", scope = \"project_id\", user = \"user_id\" }\nfilter = { column = \"state\", in = [\"open\", 3, true] }",
        );
        let c = Config::from_toml(&text).unwrap();
        let Route::Via(via) = &c.tables[0].route else {
            panic!("not a via route: {:?}", c.tables[0].route)
        };
        assert_eq!(via.table.to_string(), "public.project_members");
        assert_eq!(via.scope, "project_id");
        assert_eq!(via.member_scope, "project_id");
        assert_eq!(via.user, "user_id");
        let filter = c.tables[0].filter.as_ref().unwrap();
        assert_eq!(filter.column, "state");
        assert_eq!(
            filter.test,
            FilterTest::In(vec!["open".into(), "3".into(), "true".into()])
        );
        let other = BASE.replace(
            "{ column = \"owner_id\" }",
            "{ via = \"members\", scope = \"id\", member_scope = \"project_id\", user = \"u\" }\nfilter = { column = \"visible\" }",
        );
        let c = Config::from_toml(&other).unwrap();
        let Route::Via(via) = &c.tables[0].route else {
            panic!()
        };
        assert_eq!(
            (via.scope.as_str(), via.member_scope.as_str()),
            ("id", "project_id")
        );
        assert_eq!(c.tables[0].filter.as_ref().unwrap().test, FilterTest::True);
    }

    #[test]
    fn bad_membership_routes_and_filters_name_their_key() {
        let route = |r: &str| BASE.replace("{ column = \"owner_id\" }", r);
        assert_problem(
            &route("{ via = \"m\", scope = \"p\" }"),
            "tables[0].route.user",
        );
        assert_problem(
            &route("{ via = \"m\", user = \"u\" }"),
            "tables[0].route.scope",
        );
        assert_problem(
            &route("{ via = \"a.b.c\", scope = \"p\", user = \"u\" }"),
            "tables[0].route.via",
        );
        assert_problem(
            &route("{ column = \"owner_id\", scope = \"p\" }"),
            "only go with `via",
        );
        assert_problem(
            &route("{ column = \"o\", via = \"m\", scope = \"p\", user = \"u\" }"),
            "tables[0].route",
        );
        let filter = |f: &str| format!("{BASE}filter = {f}\n");
        assert_problem(
            &filter("{ column = \"a\", equals = 1, not_null = true }"),
            "tables[0].filter",
        );
        assert_problem(
            &filter("{ column = \"a\", in = [] }"),
            "tables[0].filter.in",
        );
        assert_problem(
            &filter("{ column = \"a\", not_null = false }"),
            "tables[0].filter.not_null",
        );
        assert_problem(&filter("{ column = \"a\", like = \"x\" }"), "like");
        assert_problem(
            &route("{ via = \"m\", scope = \"p\", user = \"u\" }\nexclude_columns = [\"p\"]"),
            "routing column",
        );
    }

    #[test]
    fn all_route_needs_users() {
        assert_problem(
            &BASE.replace("{ column = \"owner_id\" }", "{ all = true }"),
            "[users]",
        );
    }

    #[test]
    fn slot_names_are_identifiers() {
        assert_problem(
            &BASE.replace("sslmode=require\"", "sslmode=require\"\nslot = \"x; DROP\""),
            "postgres.slot",
        );
    }

    #[test]
    fn environment_overrides_keys() {
        let dir = std::env::temp_dir().join(format!("pgds-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgds.toml");
        std::fs::write(&file, BASE).unwrap();
        let env = config::Map::from([
            ("PGDS__POSTGRES__SLOT".to_owned(), "other_slot".to_owned()),
            ("PGDS__BATCH__MAX_BYTES".to_owned(), "4096".to_owned()),
            (
                "PGDS__POSTGRES__URL".to_owned(),
                "postgres://u:0123@h/d".to_owned(),
            ),
        ]);
        let c = Config::load_with_env(&file, Some(env)).unwrap();
        assert_eq!(c.postgres.slot, "other_slot");
        assert_eq!(c.batch.max_bytes, 4096);
        assert_eq!(c.postgres.conn.password(), "0123");
        let bad = config::Map::from([("PGDS__STREAMS__BASE_URLX".to_owned(), "x".to_owned())]);
        let err = Config::load_with_env(&file, Some(bad)).unwrap_err();
        assert!(err.to_string().contains("base_urlx"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
