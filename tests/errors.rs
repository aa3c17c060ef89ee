//! Clear errors: mistakes are refused at start-up (and by `pgds check`) with a message naming
//! the problem; configuration errors exit with code 2; a password never reaches any output.

use std::process::ExitStatus;
use std::time::Duration;

use crate::support::{Pgds, TestEnv, free_port, ops, run_check, run_check_with_env};

/// A valid configuration that points at nothing: enough for errors caught before connecting.
const OFFLINE: &str = r#"
[postgres]
url = "postgres://postgres@127.0.0.1:9/app?sslmode=disable"
slot = "pgds_offline"
publication = "pgds_offline"

[streams]
base_url = "http://127.0.0.1:9"
path = "/v1/stream/user/{user_id}/data"

[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

const TODOS: &str = "
    CREATE TABLE todos (id bigint PRIMARY KEY, owner_id text NOT NULL, title text);
    ALTER TABLE todos REPLICA IDENTITY FULL;
";

const TODOS_RULE: &str = r#"
[[tables]]
name = "public.todos"
route = { column = "owner_id" }
"#;

const PASSWORD: &str = "s3cretpw";

/// A failure that is pgds's own decision: non-zero, and not a panic (101) or a signal.
fn assert_refused(status: ExitStatus, output: &str, needle: &str, what: &str) {
    assert!(
        !status.success(),
        "{what}: expected a refusal, got {status}:\n{output}"
    );
    let code = status.code();
    assert!(
        code.is_some() && code != Some(101) && !output.contains("panicked"),
        "{what}: pgds crashed ({status}) instead of refusing:\n{output}"
    );
    assert!(
        output.contains(needle),
        "{what}: the message does not name {needle:?}:\n{output}"
    );
}

#[test]
fn config_mistakes_exit_2_and_name_the_key() {
    let cases = [
        (
            "unknown key",
            OFFLINE.replace("[streams]\n", "[streams]\ncolour = \"red\"\n"),
            "colour",
        ),
        (
            "unknown key in [batch]",
            format!("{OFFLINE}\n[batch]\nmax_byte = 3\n"),
            "max_byte",
        ),
        (
            "path without {user_id}",
            OFFLINE.replace("/v1/stream/user/{user_id}/data", "/v1/stream/all"),
            "streams.path",
        ),
        (
            "table listed twice",
            format!(
                "{OFFLINE}\n[[tables]]\nname = \"public.todos\"\nroute = {{ column = \"x\" }}\n"
            ),
            "tables[1]",
        ),
        (
            "unknown route kind",
            OFFLINE.replace("{ column = \"owner_id\" }", "{ via = \"public.members\" }"),
            "via",
        ),
    ];
    for (what, config, needle) in cases {
        let (status, output) = run_check(&config);
        assert_eq!(
            status.code(),
            Some(2),
            "{what}: pgds check should exit 2 for a config error:\n{output}"
        );
        assert_refused(status, &output, needle, what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_other_than_logical_is_refused() {
    let env = TestEnv::start_with(&[("wal_level", "replica")]);
    env.client().await.batch_execute(TODOS).await.unwrap();
    let config = env.config(TODOS_RULE);

    let (status, output) = run_check(&config);
    assert_refused(status, &output, "wal_level", "pgds check");

    let mut pgds = Pgds::spawn(&config);
    let status = pgds.wait_exit(Duration::from_secs(60)).await;
    assert_refused(status, &pgds.log(), "wal_level", "pgds run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tables_and_columns_are_named() {
    let env = TestEnv::start();
    env.client()
        .await
        .batch_execute(&format!(
            "{TODOS} CREATE TABLE people (id text PRIMARY KEY);"
        ))
        .await
        .unwrap();
    let cases = [
        (
            "missing table",
            "[[tables]]\nname = \"public.nope_table\"\nroute = { column = \"owner_id\" }\n",
            "nope_table",
        ),
        (
            "missing route column",
            "[[tables]]\nname = \"public.todos\"\nroute = { column = \"no_such_col\" }\n",
            "no_such_col",
        ),
        (
            "missing excluded column",
            "[[tables]]\nname = \"public.todos\"\nroute = { column = \"owner_id\" }\nexclude_columns = [\"ghost_col\"]\n",
            "ghost_col",
        ),
        (
            "missing users table",
            "[users]\ntable = \"public.no_users\"\ncolumn = \"id\"\n[[tables]]\nname = \"public.todos\"\nroute = { all = true }\n",
            "no_users",
        ),
        (
            "missing users column",
            "[users]\ntable = \"public.people\"\ncolumn = \"uid_col\"\n[[tables]]\nname = \"public.todos\"\nroute = { all = true }\n",
            "uid_col",
        ),
    ];
    for (what, tables, needle) in cases {
        let (status, output) = run_check(&env.config(tables));
        assert_refused(status, &output, needle, what);
    }

    let mut pgds = Pgds::spawn(&env.config(cases[0].1));
    let status = pgds.wait_exit(Duration::from_secs(60)).await;
    assert_refused(
        status,
        &pgds.log(),
        "nope_table",
        "pgds run with a missing table",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_is_checked() {
    let env = TestEnv::start();
    env.client()
        .await
        .batch_execute(&format!(
            "{TODOS}
             CREATE TABLE plain (id bigint PRIMARY KEY, owner_id text NOT NULL);
             CREATE TABLE profiles (owner_id text PRIMARY KEY, bio text);"
        ))
        .await
        .unwrap();

    // Routing by a column outside the replica identity needs REPLICA IDENTITY FULL.
    let (status, output) = run_check(
        &env.config("[[tables]]\nname = \"public.plain\"\nroute = { column = \"owner_id\" }\n"),
    );
    assert_refused(status, &output, "plain", "default replica identity");
    assert!(
        output.to_uppercase().contains("REPLICA IDENTITY"),
        "the message should name the fix (REPLICA IDENTITY FULL):\n{output}"
    );

    // Routing by the primary key works with the default identity; FULL tables pass.
    let (status, output) = run_check(&env.config(&format!(
        "{TODOS_RULE}\n[[tables]]\nname = \"public.profiles\"\nroute = {{ column = \"owner_id\" }}\n"
    )));
    assert!(
        status.success(),
        "pgds check refused a good setup ({status}):\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_appears_in_any_output() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(TODOS).await.unwrap();
    let with_password = |config: String| {
        config.replace(
            "postgres://postgres@",
            &format!("postgres://postgres:{PASSWORD}@"),
        )
    };
    let good = with_password(env.config(TODOS_RULE));
    assert!(good.contains(PASSWORD));
    let assert_clean = |what: &str, output: &str| {
        assert!(
            !output.contains(PASSWORD),
            "{what}: the password appears in the output:\n{output}"
        );
    };

    // The server trusts any password: check passes, and says nothing of it.
    let (status, output) = run_check(&good);
    assert!(status.success(), "pgds check ({status}):\n{output}");
    assert_clean("check", &output);

    let failing =
        [
            (
                "missing table",
                with_password(env.config(
                    "[[tables]]\nname = \"public.nope\"\nroute = { column = \"owner_id\" }\n",
                )),
            ),
            (
                "config error",
                good.replace("[streams]\n", "[streams]\ncolour = \"red\"\n"),
            ),
            (
                "unreachable server",
                good.replace(
                    &format!("127.0.0.1:{}", env.pg.port()),
                    &format!("127.0.0.1:{}", free_port()),
                ),
            ),
            (
                "bad sslmode",
                good.replace("sslmode=disable", "sslmode=sometimes"),
            ),
        ];
    for (what, config) in &failing {
        let (status, output) = run_check(config);
        assert!(!status.success(), "{what}: pgds check passed:\n{output}");
        assert_clean(what, &output);
    }

    // The URL from the environment, with a password that looks like a number.
    let env_url = format!(
        "postgres://postgres:0123{PASSWORD}@127.0.0.1:{}/{}?sslmode=disable",
        env.pg.port(),
        env.db
    );
    let (status, output) = run_check_with_env(
        &env.config(TODOS_RULE),
        &[("PGDS__POSTGRES__URL", &env_url)],
    );
    assert!(
        status.success(),
        "pgds check with PGDS__POSTGRES__URL ({status}):\n{output}"
    );
    assert_clean("check with the URL from the environment", &output);

    // A full run with debug logs: start, replicate a row, stop.
    let mut pgds = Pgds::spawn(&good);
    env.wait_streaming(&mut pgds).await;
    db.execute("INSERT INTO todos VALUES (1, 'alice', 'x')", &[])
        .await
        .unwrap();
    env.events_until("alice", |e| !e.is_empty()).await;
    pgds.terminate().await;
    assert_clean("run", &pgds.log());
}

/// `config` connecting as `role` instead of `postgres` (the test cluster trusts every login).
fn as_role(config: &str, role: &str) -> String {
    let as_role = config.replace("postgres://postgres@", &format!("postgres://{role}@"));
    assert_ne!(as_role, config, "the config names the postgres role");
    as_role
}

/// What `pgds check` says of a role that may not stream replication.
const NO_REPLICATION: &str = "may not stream replication";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rds_replication_membership_is_the_replication_privilege() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(&format!(
        "{TODOS}
         CREATE ROLE plain_login LOGIN;
         GRANT SELECT ON todos TO plain_login;
         GRANT CREATE ON DATABASE app TO plain_login;"
    ))
    .await
    .unwrap();
    let config = env.config(TODOS_RULE);

    // Without the attribute, and no role rds_replication in this cluster: refused, with the fix
    // for both kinds of servers (and no error from looking up a role that does not exist).
    let (status, output) = run_check(&as_role(&config, "plain_login"));
    assert_refused(
        status,
        &output,
        NO_REPLICATION,
        "a login role without REPLICATION",
    );
    assert!(
        output.contains("GRANT rds_replication TO plain_login") && !output.contains("failed"),
        "{output}"
    );

    // Amazon RDS: no REPLICATION attribute, membership of rds_replication instead (directly or
    // through another role).
    db.batch_execute(
        "CREATE ROLE rds_replication NOLOGIN;
         CREATE ROLE rds_member LOGIN IN ROLE rds_replication;
         CREATE ROLE app_roles NOLOGIN IN ROLE rds_replication;
         CREATE ROLE nested_member LOGIN IN ROLE app_roles;
         GRANT SELECT ON todos TO rds_member, nested_member;
         GRANT CREATE ON DATABASE app TO rds_member, nested_member;",
    )
    .await
    .unwrap();
    let attributes = db
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname IN ('rds_member', 'nested_member') \
             AND NOT rolsuper AND NOT rolreplication",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        attributes.len(),
        2,
        "the members have no REPLICATION attribute"
    );
    for role in ["rds_member", "nested_member"] {
        let (status, output) = run_check(&as_role(&config, role));
        assert!(
            !output.contains(NO_REPLICATION),
            "{role}: membership of rds_replication should count:\n{output}"
        );
        assert!(status.success(), "{role}: pgds check ({status}):\n{output}");
    }
    let (status, output) = run_check(&as_role(&config, "plain_login"));
    assert_refused(
        status,
        &output,
        NO_REPLICATION,
        "a role outside rds_replication",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_on_the_database_or_a_usable_pgds_schema_is_required() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(&format!(
        "{TODOS}
         CREATE ROLE app_pgds LOGIN REPLICATION;
         ALTER TABLE todos OWNER TO app_pgds;"
    ))
    .await
    .unwrap();
    let config = as_role(&env.config(TODOS_RULE), "app_pgds");

    // A role without CREATE on the database can neither create schema pgds nor the publication.
    let (status, output) = run_check(&config);
    assert_refused(
        status,
        &output,
        "may not create schema pgds",
        "no CREATE on the database",
    );
    assert!(
        output.contains("GRANT CREATE ON DATABASE \"app\" TO app_pgds")
            && output.contains(&format!("publication {:?} does not exist", env.publication)),
        "{output}"
    );

    db.batch_execute("GRANT CREATE ON DATABASE app TO app_pgds")
        .await
        .unwrap();
    let (status, output) = run_check(&config);
    assert!(
        status.success(),
        "with CREATE on the database ({status}):\n{output}"
    );

    // An administrator prepared schema pgds and the publication instead: the schema must be
    // usable by the role.
    db.batch_execute(&format!(
        "REVOKE CREATE ON DATABASE app FROM app_pgds;
         CREATE SCHEMA pgds;
         CREATE PUBLICATION {} FOR TABLE todos;",
        env.publication
    ))
    .await
    .unwrap();
    let (status, output) = run_check(&config);
    assert_refused(
        status,
        &output,
        "GRANT USAGE, CREATE ON SCHEMA pgds TO app_pgds",
        "a schema pgds the role may not use",
    );
    assert!(!output.contains("may not create schema pgds"), "{output}");
    assert!(!output.contains("does not exist and role"), "{output}");

    db.batch_execute("GRANT USAGE, CREATE ON SCHEMA pgds TO app_pgds")
        .await
        .unwrap();
    let (status, output) = run_check(&config);
    assert!(
        status.success(),
        "with a usable schema pgds ({status}):\n{output}"
    );

    // What the check promises holds: pgds runs as that role, its migrations and initial copy
    // in the prepared schema, without CREATE on the database.
    db.execute("INSERT INTO todos VALUES (1, 'alice', 'before')", &[])
        .await
        .unwrap();
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    db.execute("INSERT INTO todos VALUES (2, 'alice', 'after')", &[])
        .await
        .unwrap();
    let events = env
        .events_until("alice", |e| ops(e).contains(&"insert todos 2".to_owned()))
        .await;
    assert!(
        ops(&events).contains(&"insert todos 1".to_owned()),
        "the initial copy: {events:?}"
    );
    assert!(pgds.terminate().await.success(), "{}", pgds.log_tail(40));
    let stored = db
        .query_opt(
            "SELECT lsn::text FROM pgds.checkpoints WHERE slot = $1",
            &[&env.slot],
        )
        .await
        .unwrap();
    assert!(
        stored.is_some(),
        "the checkpoint is stored in the prepared schema"
    );
}
