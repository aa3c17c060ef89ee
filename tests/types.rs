//! Every common column type reaches the stream as the exact JSON value a client expects, and
//! large (TOASTed) values are never lost on updates that leave them unchanged.

use serde_json::{Value, json};

use crate::support::{Pgds, TestEnv, changes, materialize, ops, run_check};

const SCHEMA: &str = r#"
    CREATE TYPE mood AS ENUM ('happy', 'sad');
    CREATE TABLE typed (
        id int PRIMARY KEY,
        owner_id text NOT NULL,
        b bool,
        i2 int2,
        i4 int4,
        i8_small int8,
        i8_safe int8,
        i8_2p53 int8,
        i8_max int8,
        f4 real,
        f8 float8,
        f8_nan float8,
        f8_inf float8,
        num numeric,
        t text,
        vc varchar(20),
        ch char(3),
        u uuid,
        j json,
        jb jsonb,
        d date,
        tm time,
        ts timestamp,
        tstz timestamptz,
        bin bytea,
        ia int4[],
        ta text[],
        e mood,
        n_text text,
        n_int int4,
        n_arr int4[]
    );
    ALTER TABLE typed REPLICA IDENTITY FULL;
"#;

const INSERT: &str = r#"
    INSERT INTO typed VALUES (
        1, 'alice', true, -32768, 2147483647,
        42, 9007199254740991, 9007199254740992, 9223372036854775807,
        1.5, 0.1, 'NaN', 'Infinity',
        '12345678901234567890.123456789',
        $1, 'hello', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '{"a": [1, 2, {"b": null}]}', '{"nested": {"x": 1, "y": [true, "s"]}}',
        '2026-11-29', '10:30:00', '2026-11-29 10:30:00.123456', '2026-11-29 12:30:00.123456+02',
        '\x0102ff', '{1,2,NULL,3}', ARRAY['a', NULL, 'NULL', 'with "quote"', 'comma,here', ''],
        'happy', NULL, NULL, NULL
    )
"#;

/// Quotes, a backslash, control characters and characters outside the BMP.
const TEXT: &str = "emoji 🎉 \"quoted\" it's a \\ backslash\nnew line\ttab é";

fn expected() -> Value {
    json!({
        "id": 1,
        "owner_id": "alice",
        "b": true,
        "i2": -32768,
        "i4": 2147483647,
        "i8_small": 42,
        // Up to 2^53 - 1 a number (exact in every JSON client), beyond it a string.
        "i8_safe": 9007199254740991_i64,
        "i8_2p53": "9007199254740992",
        "i8_max": "9223372036854775807",
        "f4": 1.5,
        "f8": 0.1,
        "f8_nan": "NaN",
        "f8_inf": "Infinity",
        "num": "12345678901234567890.123456789",
        "t": TEXT,
        "vc": "hello",
        "ch": "ab ",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"a": [1, 2, {"b": null}]},
        "jb": {"nested": {"x": 1, "y": [true, "s"]}},
        "d": "2026-11-29",
        "tm": "10:30:00",
        "ts": "2026-11-29T10:30:00.123456",
        "tstz": "2026-11-29T10:30:00.123456Z",
        "bin": "\\x0102ff",
        "ia": [1, 2, null, 3],
        "ta": ["a", null, "NULL", "with \"quote\"", "comma,here", ""],
        "e": "happy",
        "n_text": null,
        "n_int": null,
        "n_arr": null,
    })
}

/// Compare column by column, so a failure names the column.
fn assert_row(got: &Value, want: &Value) {
    let (Some(got), Some(want)) = (got.as_object(), want.as_object()) else {
        panic!("not objects: {got} / {want}");
    };
    for (column, value) in want {
        assert_eq!(
            got.get(column),
            Some(value),
            "column {column}: got {:?}, want {value}",
            got.get(column)
        );
    }
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(extra.is_empty(), "unexpected columns {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_type_has_its_exact_json_value() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let mut pgds = Pgds::spawn(&env.config(
        r#"
[[tables]]
name = "public.typed"
route = { column = "owner_id" }
"#,
    ));
    env.wait_streaming(&mut pgds).await;

    db.execute(INSERT, &[&TEXT]).await.unwrap();
    db.execute("UPDATE typed SET i4 = 7 WHERE id = 1", &[])
        .await
        .unwrap();

    let events = env.events_until("alice", |e| ops(e).len() >= 2).await;
    assert_eq!(ops(&events), ["insert typed 1", "update typed 1"]);
    let events = changes(&events);
    assert_row(&events[0]["value"], &expected());
    let mut updated = expected();
    updated["i4"] = json!(7);
    assert_row(&events[1]["value"], &updated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_values_are_kept_on_update() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, owner_id text NOT NULL, big text, n int);
         ALTER TABLE docs ALTER COLUMN big SET STORAGE EXTERNAL;
         ALTER TABLE docs REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut pgds = Pgds::spawn(&env.config(
        r#"
[[tables]]
name = "public.docs"
route = { column = "owner_id" }
"#,
    ));
    env.wait_streaming(&mut pgds).await;

    let big = "abcdefghij".repeat(10_000);
    db.execute(
        "INSERT INTO docs VALUES (1, 'alice', $1, 0)",
        &[&big.as_str()],
    )
    .await
    .unwrap();
    // Neither update touches `big`: Postgres sends it as "unchanged TOAST" in the new row.
    db.execute("UPDATE docs SET n = 1 WHERE id = 1", &[])
        .await
        .unwrap();
    db.execute("UPDATE docs SET owner_id = 'bob' WHERE id = 1", &[])
        .await
        .unwrap();

    let alice = env.events_until("alice", |e| ops(e).len() >= 3).await;
    assert_eq!(
        ops(&alice),
        ["insert docs 1", "update docs 1", "delete docs 1"]
    );
    let bob = env.events_until("bob", |e| !ops(e).is_empty()).await;
    assert_eq!(ops(&bob), ["insert docs 1"]);
    let update = changes(&alice)[1];
    let insert = changes(&bob)[0];
    for (what, event, n) in [("update", update, 1), ("moved insert", insert, 1)] {
        assert_eq!(event["value"]["n"], json!(n), "{what}");
        let got = event["value"]["big"].as_str();
        assert!(
            got == Some(big.as_str()),
            "{what}: the unchanged TOAST column arrived as {} instead of its {}-byte value",
            got.map_or_else(
                || event["value"]["big"].to_string(),
                |s| format!("{} bytes", s.len())
            ),
            big.len()
        );
    }
}

/// Without the value in the old row (replica identity on the key and owner only), an UPDATE
/// that leaves a TOASTed value unchanged omits it and says so in `headers.unchanged`; `pgds
/// check` explains it, and `postgres.full_identity_for_toast` makes pgds set FULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_without_full_identity_is_flagged_and_reported() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, owner_id text NOT NULL, big text, n int);
         ALTER TABLE docs ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE UNIQUE INDEX docs_ident ON docs (id, owner_id);
         ALTER TABLE docs REPLICA IDENTITY USING INDEX docs_ident;",
    )
    .await
    .unwrap();
    let rules = r#"
[[tables]]
name = "public.docs"
route = { column = "owner_id" }
"#;
    let config = env.config(rules);
    let (status, output) = run_check(&config);
    assert!(status.success(), "pgds check: {output}");
    assert!(
        output.contains("TOASTable column big") && output.contains("headers.unchanged"),
        "pgds check does not explain unchanged TOAST values:\n{output}"
    );
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    let big = "abcdefghij".repeat(10_000);
    db.execute(
        "INSERT INTO docs VALUES (1, 'alice', $1, 0)",
        &[&big.as_str()],
    )
    .await
    .unwrap();
    db.execute("UPDATE docs SET n = 1 WHERE id = 1", &[])
        .await
        .unwrap();
    let alice = env.events_until("alice", |e| ops(e).len() >= 2).await;
    let update = changes(&alice)[1];
    assert_eq!(update["value"]["n"], json!(1));
    assert!(update["value"].get("big").is_none(), "{update}");
    assert_eq!(update["headers"]["unchanged"], json!(["big"]));
    let state = materialize(&alice);
    assert_eq!(
        state[&("docs".to_owned(), "1".to_owned())]["big"],
        json!(big)
    );
    assert!(pgds.terminate().await.success());

    let config = config.replace(
        "[postgres]\n",
        "[postgres]\nfull_identity_for_toast = true\n",
    );
    assert!(config.contains("full_identity_for_toast"), "{config}");
    let mut pgds = Pgds::spawn(&config);
    env.wait_streaming(&mut pgds).await;
    let identity: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'docs'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "f");
    db.execute("UPDATE docs SET n = 2 WHERE id = 1", &[])
        .await
        .unwrap();
    let alice = env.events_until("alice", |e| ops(e).len() >= 3).await;
    let update = changes(&alice)[2];
    assert_eq!(update["value"]["big"], json!(big));
    assert!(update["headers"].get("unchanged").is_none(), "{update}");
}

/// One column of the type matrix: its SQL type, a literal, and the exact JSON expected.
struct Case {
    ty: &'static str,
    literal: &'static str,
    want: Value,
}

fn case(ty: &'static str, literal: &'static str, want: Value) -> Case {
    Case { ty, literal, want }
}

/// Characters from every Unicode plane that holds assigned or private-use code points.
const PLANES: &str = "BMP é 中 \u{FFFD}, SMP 🎉 \u{1F389}, SIP \u{20000}, TIP \u{30000}, SSP \u{E0001}, PUA \u{F0000} \u{10FFFD}";

fn matrix() -> Vec<Case> {
    vec![
        case("numeric", "'NaN'", json!("NaN")),
        case("numeric", "'Infinity'", json!("Infinity")),
        case("numeric", "'-Infinity'", json!("-Infinity")),
        case("numeric(12,9)", "'-0.000001230'", json!("-0.000001230")),
        case("float4", "'-Infinity'", json!("-Infinity")),
        case(
            "int8",
            "-9223372036854775808",
            json!("-9223372036854775808"),
        ),
        case("money", "12.34", json!("$12.34")),
        case(
            "interval",
            "'1 year 2 mons 3 days 04:05:06.789'",
            json!("P1Y2M3DT4H5M6.789S"),
        ),
        case("interval", "'-1 day'", json!("P-1D")),
        case("timetz", "'10:30:00.5+05:30'", json!("10:30:00.5+05:30")),
        case("inet", "'192.168.0.1/24'", json!("192.168.0.1/24")),
        case("inet", "'::1'", json!("::1")),
        case("cidr", "'10.0.0.0/8'", json!("10.0.0.0/8")),
        case("macaddr", "'08:00:2b:01:02:03'", json!("08:00:2b:01:02:03")),
        case(
            "macaddr8",
            "'08:00:2b:01:02:03:04:05'",
            json!("08:00:2b:01:02:03:04:05"),
        ),
        case("bit(4)", "B'1010'", json!("1010")),
        case("varbit", "B'101'", json!("101")),
        case("point", "'(1,2)'", json!("(1,2)")),
        case("box", "'((0,0),(1,1))'", json!("(1,1),(0,0)")),
        case("circle", "'<(1,2),3>'", json!("<(1,2),3>")),
        case("line", "'{1,2,3}'", json!("{1,2,3}")),
        case("lseg", "'[(0,0),(1,1)]'", json!("[(0,0),(1,1)]")),
        case(
            "path",
            "'((0,0),(1,1),(2,0))'",
            json!("((0,0),(1,1),(2,0))"),
        ),
        case(
            "polygon",
            "'((0,0),(1,1),(2,0))'",
            json!("((0,0),(1,1),(2,0))"),
        ),
        case(
            "box[]",
            "ARRAY['((0,0),(1,1))'::box, NULL]",
            json!(["(1,1),(0,0)", null]),
        ),
        case("int4range", "'[1,10)'", json!("[1,10)")),
        case("numrange", "'(1.5,2.5]'", json!("(1.5,2.5]")),
        case("daterange", "'empty'", json!("empty")),
        case(
            "tstzrange",
            "'[2026-01-01 00:00+00,infinity)'",
            json!("[\"2026-01-01 00:00:00+00\",infinity)"),
        ),
        case("int4multirange", "'{[1,3),[5,7)}'", json!("{[1,3),[5,7)}")),
        case(
            "hstore",
            r#"'"a"=>"1", "b"=>NULL, "q\"k"=>"v"'"#,
            json!({"a": "1", "b": null, "q\"k": "v"}),
        ),
        case("posint", "5", json!(5)),
        case("label", "'x'", json!("x")),
        case(
            "pair",
            "ROW(1, 'x \"y\" z')",
            json!({"n": 1, "label": "x \"y\" z"}),
        ),
        case("pair", "ROW(NULL, '')", json!({"n": null, "label": ""})),
        case(
            "pair[]",
            "ARRAY[ROW(1, 'a')::pair, NULL]",
            json!([{"n": 1, "label": "a"}, null]),
        ),
        case("int4[]", "'{{1,2},{3,NULL}}'", json!([[1, 2], [3, null]])),
        case(
            "text[]",
            "ARRAY[[NULL, 'a'], ['b', NULL]]",
            json!([[null, "a"], ["b", null]]),
        ),
        case("int4[]", "'[0:1]={7,8}'", json!([7, 8])),
        case("mood", "'sad'", json!("sad")),
        case("mood[]", "'{happy,NULL}'", json!(["happy", null])),
        case(
            "json",
            r#"'{"a": "\u00e9\ud83c\udf89", "nul": "\u0000"}'"#,
            json!({"a": "é🎉", "nul": "\u{0}"}),
        ),
        case(
            "jsonb",
            r#"'{"a": "\u00e9\ud83c\udf89"}'"#,
            json!({"a": "é🎉"}),
        ),
        case("jsonb", "'[]'", json!([])),
        case("jsonb", "'null'", json!(null)),
        case("text", "$planes$PLANES$planes$", json!(PLANES)),
        case("text", "''", json!("")),
        case("timestamp", "'infinity'", json!("infinity")),
        case("timestamp", "'-infinity'", json!("-infinity")),
        case(
            "timestamp",
            "'0044-03-15 12:00:00 BC'",
            json!("0044-03-15 12:00:00 BC"),
        ),
        case("timestamptz", "'infinity'", json!("infinity")),
        case("timestamptz", "'-infinity'", json!("-infinity")),
        case(
            "timestamptz",
            "'2026-11-29 10:30:00+05:30'",
            json!("2026-11-29T05:00:00Z"),
        ),
        case("date", "'infinity'", json!("infinity")),
        case("date", "'-infinity'", json!("-infinity")),
        case("date", "'0044-03-15 BC'", json!("0044-03-15 BC")),
        case("bytea", "''", json!("\\x")),
        case(
            "uuid",
            "'00000000-0000-0000-0000-000000000000'",
            json!("00000000-0000-0000-0000-000000000000"),
        ),
        case("char", "'x'", json!("x")),
        case("name", "'a_name'", json!("a_name")),
        case("oid", "4294967295", json!(4294967295_u32)),
    ]
}

/// Every type of the matrix, in the initial copy (COPY text) and in live changes (pgoutput
/// text), has its exact JSON value; an UPDATE carries it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_matrix_has_exact_json_in_copies_and_changes() {
    let env = TestEnv::start();
    let db = env.client().await;
    let cases = matrix();
    let columns: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| format!("c{i} {}", c.ty))
        .collect();
    let literals: Vec<String> = cases
        .iter()
        .map(|c| c.literal.replace("PLANES", PLANES))
        .collect();
    db.batch_execute(&format!(
        "CREATE EXTENSION hstore;
         CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
         CREATE DOMAIN label AS text;
         CREATE TYPE pair AS (n int, label text);
         CREATE TABLE matrix (id int PRIMARY KEY, owner_id text NOT NULL,
                              gen int GENERATED ALWAYS AS (id * 2) STORED, {});
         ALTER TABLE matrix REPLICA IDENTITY FULL;
         INSERT INTO matrix VALUES (1, 'alice', DEFAULT, {});",
        columns.join(", "),
        literals.join(", ")
    ))
    .await
    .unwrap();
    let mut pgds = Pgds::spawn(&env.config(
        r#"
[[tables]]
name = "public.matrix"
route = { column = "owner_id" }
"#,
    ));
    env.wait_streaming(&mut pgds).await;
    db.batch_execute(&format!(
        "INSERT INTO matrix VALUES (2, 'alice', DEFAULT, {});
         UPDATE matrix SET owner_id = owner_id WHERE id = 2;",
        literals.join(", ")
    ))
    .await
    .unwrap();
    let events = env.events_until("alice", |e| changes(e).len() >= 3).await;
    let rows = changes(&events);
    assert_eq!(
        ops(&events),
        ["insert matrix 1", "insert matrix 2", "update matrix 2"]
    );
    let mut failures = Vec::new();
    for (path, row) in ["copy", "insert", "update"].iter().zip(&rows) {
        // Generated columns are not published (pgoutput leaves them out; so does the copy).
        if row["value"].get("gen").is_some() {
            failures.push(format!("{path}: the generated column was published"));
        }
        for (i, c) in cases.iter().enumerate() {
            let got = &row["value"][format!("c{i}")];
            if *got != c.want {
                failures.push(format!(
                    "{path}: {} {}: got {got}, want {}",
                    c.ty, c.literal, c.want
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A table without a primary key is refused with a clear message: events need a stable key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_primary_key_is_refused() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE nokey (owner_id text NOT NULL, title text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let (status, output) = run_check(&env.config(
        r#"
[[tables]]
name = "public.nokey"
route = { column = "owner_id" }
"#,
    ));
    assert_eq!(status.code(), Some(3), "{output}");
    assert!(
        output.contains("public.nokey") && output.contains("has no primary key"),
        "{output}"
    );
}

/// Types created after pgds started (announced by pgoutput's `Type` messages) convert by their
/// rules, not as text: an enum array is a JSON array, a composite an object, a domain over an
/// integer a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_created_while_running_convert_by_their_rules() {
    let env = TestEnv::start();
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE later (id int PRIMARY KEY, owner_id text NOT NULL);
         ALTER TABLE later REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut pgds = Pgds::spawn(&env.config(
        r#"
[[tables]]
name = "public.later"
route = { column = "owner_id" }
"#,
    ));
    env.wait_streaming(&mut pgds).await;
    db.batch_execute(
        "INSERT INTO later VALUES (1, 'alice');
         CREATE TYPE weather AS ENUM ('rain', 'sun');
         CREATE TYPE point2 AS (x int, tag weather);
         CREATE DOMAIN small AS int2 CHECK (VALUE < 100);
         ALTER TABLE later ADD COLUMN skies weather[], ADD COLUMN p point2, ADD COLUMN n small;
         INSERT INTO later VALUES (2, 'alice', '{rain,sun}', '(3,sun)', 7);",
    )
    .await
    .unwrap();
    let events = env.events_until("alice", |e| changes(e).len() >= 2).await;
    assert_eq!(ops(&events), ["insert later 1", "insert later 2"]);
    assert_row(
        &changes(&events)[1]["value"],
        &json!({"id": 2, "owner_id": "alice", "skies": ["rain", "sun"],
                "p": {"x": 3, "tag": "sun"}, "n": 7}),
    );
}
