use super::*;
use std::time::Duration;

fn ns(name: &str) -> Namespace {
    Namespace::new(name).expect("valid namespace")
}

fn open(limits: StoreLimits) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("sql"), limits).expect("open store");
    (dir, store)
}

fn store() -> (tempfile::TempDir, SqliteStore) {
    open(StoreLimits::default())
}

fn text(s: &str) -> SqlValue {
    SqlValue::Text(s.into())
}

async fn exec(store: &SqliteStore, n: &Namespace, sql: &str) -> ExecuteResult {
    store
        .execute(n, sql.into(), vec![])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

fn count(store: &SqliteStore, n: &Namespace, table: &str) -> i64 {
    let r = store
        .query(n, &format!("SELECT count(*) FROM {table}"), vec![])
        .expect("count");
    match r.rows[0][0] {
        SqlValue::Integer(c) => c,
        ref other => panic!("count returned {other:?}"),
    }
}

fn is_invalid(r: &StoreResult<impl std::fmt::Debug>) -> bool {
    matches!(r, Err(StoreError::Invalid(_)))
}

fn message(e: &StoreError) -> &str {
    match e {
        StoreError::Invalid(m)
        | StoreError::Limit(m)
        | StoreError::Unavailable(m)
        | StoreError::Conflict(m)
        | StoreError::Internal(m) => m,
    }
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let (dir, store) = store();
    let (a, b) = (ns("a"), ns("b"));
    exec(&store, &a, "CREATE TABLE t(x)").await;
    exec(&store, &a, "INSERT INTO t VALUES ('secret')").await;
    assert!(dir.path().join("sql/a.db").exists());

    // B has its own, empty database.
    let err = store.query(&b, "SELECT * FROM t", vec![]).unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("no such table")),
        "{err:?}"
    );
    let master = store
        .query(&b, "SELECT name FROM sqlite_master", vec![])
        .unwrap();
    assert!(master.rows.is_empty());

    // ATTACH of A's file from B fails, through either call, with or
    // without a parameter for the file name.
    let a_path = dir.path().join("sql/a.db").display().to_string();
    let attach = format!("ATTACH DATABASE '{a_path}' AS other");
    let errors = [
        store.execute(&b, attach.clone(), vec![]).await.unwrap_err(),
        store.query(&b, &attach, vec![]).unwrap_err(),
        store
            .execute(&b, "ATTACH ? AS other".into(), vec![text(&a_path)])
            .await
            .unwrap_err(),
        store
            .execute(&b, "SELECT sqlite_attach('x', 'y', NULL)".into(), vec![])
            .await
            .unwrap_err(),
        store
            .query(
                &b,
                "SELECT * FROM json_each(readfile(?))",
                vec![text(&a_path)],
            )
            .unwrap_err(),
        store
            .execute(&b, "DETACH main".into(), vec![])
            .await
            .unwrap_err(),
    ];
    for e in &errors {
        assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
        assert!(!message(e).contains(&a_path), "message leaks a path: {e:?}");
    }
    for e in [&errors[0], &errors[2]] {
        assert_eq!(
            message(e),
            "not authorized: ATTACH, DETACH and VACUUM are not allowed"
        );
    }
    let master = store
        .query(&b, "SELECT name FROM sqlite_master", vec![])
        .unwrap();
    assert!(master.rows.is_empty());
    // A's data is untouched and only visible to A.
    let rows = store.query(&a, "SELECT x FROM t", vec![]).unwrap();
    assert_eq!(rows.rows, vec![vec![text("secret")]]);
}

#[tokio::test]
async fn vacuum_into_is_refused() {
    let (dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    exec(&store, &a, "INSERT INTO t VALUES ('secret')").await;
    let target = dir.path().join("stolen.db");
    let sql = format!("VACUUM INTO '{}'", target.display());
    let e = store.execute(&a, sql.clone(), vec![]).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("not allowed")),
        "{e:?}"
    );
    assert!(!message(&e).contains(&target.display().to_string()));
    let e = store
        .execute(
            &a,
            "VACUUM INTO ?".into(),
            vec![text(&target.display().to_string())],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    assert!(is_invalid(&store.query(&a, &sql, vec![])));
    assert!(!target.exists(), "VACUUM INTO wrote a file");
    // Plain VACUUM attaches a temporary database internally, so it is
    // refused as well.
    assert!(is_invalid(
        &store.execute(&a, "VACUUM".into(), vec![]).await
    ));
    assert_eq!(count(&store, &a, "t"), 1);
}

#[tokio::test]
async fn injection_through_parameters_is_inert() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(name TEXT)").await;
    let evil = "'); DROP TABLE t; --";
    let r = store
        .execute(
            &a,
            "INSERT INTO t(name) VALUES (?)".into(),
            vec![text(evil)],
        )
        .await
        .unwrap();
    assert_eq!(r.rows_affected, 1);
    let rows = store
        .query(&a, "SELECT name FROM t WHERE name = ?1", vec![text(evil)])
        .unwrap();
    assert_eq!(rows.columns, vec!["name".to_string()]);
    assert_eq!(rows.rows, vec![vec![text(evil)]]);
    assert_eq!(count(&store, &a, "t"), 1);
}

#[tokio::test]
async fn every_value_kind_round_trips() {
    let (_dir, store) = store();
    let a = ns("a");
    // No declared types: no affinity conversions.
    exec(&store, &a, "CREATE TABLE v(i INTEGER PRIMARY KEY, x)").await;
    let values = vec![
        SqlValue::Null,
        SqlValue::Integer(0),
        SqlValue::Integer(i64::MIN),
        SqlValue::Integer(i64::MAX),
        SqlValue::Integer(-1),
        SqlValue::Real(0.0),
        SqlValue::Real(-1.5),
        SqlValue::Real(f64::MAX),
        SqlValue::Real(f64::MIN_POSITIVE),
        SqlValue::Real(1e-300),
        SqlValue::Real(f64::INFINITY),
        text(""),
        text("héllo wörld ✓ 🦀"),
        text("nul\0inside"),
        SqlValue::Blob(vec![]),
        SqlValue::Blob(vec![0, 1, 2, 255, 0]),
    ];
    for v in &values {
        store
            .execute(&a, "INSERT INTO v(x) VALUES (?)".into(), vec![v.clone()])
            .await
            .unwrap();
    }
    let r = store
        .query(&a, "SELECT x, typeof(x) FROM v ORDER BY i", vec![])
        .unwrap();
    assert_eq!(r.columns, vec!["x".to_string(), "typeof(x)".to_string()]);
    let got: Vec<SqlValue> = r.rows.iter().map(|row| row[0].clone()).collect();
    assert_eq!(got, values);
    let types: Vec<SqlValue> = r.rows.iter().map(|row| row[1].clone()).collect();
    assert_eq!(types[0], text("null"));
    assert_eq!(types[14], text("blob"), "empty blob stays a blob");
    assert_eq!(types[11], text("text"), "empty text stays text");

    // Every kind as a parameter of a query, too.
    let r = store
        .query(
            &a,
            "SELECT ?, ?, ?, ?, ?",
            vec![
                SqlValue::Null,
                SqlValue::Integer(i64::MIN),
                SqlValue::Real(2.5),
                text("t"),
                SqlValue::Blob(vec![9]),
            ],
        )
        .unwrap();
    assert_eq!(
        r.rows,
        vec![vec![
            SqlValue::Null,
            SqlValue::Integer(i64::MIN),
            SqlValue::Real(2.5),
            text("t"),
            SqlValue::Blob(vec![9]),
        ]]
    );
}

#[tokio::test]
async fn invalid_utf8_text_is_returned_as_blob() {
    let (_dir, store) = store();
    let a = ns("a");
    let r = store
        .query(&a, "SELECT CAST(x'ff00fe' AS TEXT) AS t", vec![])
        .unwrap();
    assert_eq!(r.rows, vec![vec![SqlValue::Blob(vec![0xff, 0x00, 0xfe])]]);
    exec(&store, &a, "CREATE TABLE t(x TEXT)").await;
    exec(&store, &a, "INSERT INTO t VALUES (CAST(x'c328' AS TEXT))").await;
    let r = store
        .query(&a, "SELECT x, length(x) FROM t", vec![])
        .unwrap();
    assert_eq!(r.rows[0][0], SqlValue::Blob(vec![0xc3, 0x28]));
}

#[tokio::test]
async fn batch_is_atomic() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(
        &store,
        &a,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)",
    )
    .await;
    let stmt = |sql: &str, params: Vec<SqlValue>| SqlStatement {
        sql: sql.into(),
        params,
    };
    let e = store
        .execute_batch(
            &a,
            vec![
                stmt("INSERT INTO t(v) VALUES (?)", vec![text("one")]),
                stmt("INSERT INTO t(v) VALUES (?)", vec![text("two")]),
                stmt("INSERT INTO t(v) VALUES (?)", vec![SqlValue::Null]),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict(m) if m.starts_with("statement 2: ") && m.contains("NOT NULL")),
        "{e:?}"
    );
    assert_eq!(count(&store, &a, "t"), 0);

    // A syntax error in the middle, too.
    let e = store
        .execute_batch(
            &a,
            vec![
                stmt("INSERT INTO t(v) VALUES ('x')", vec![]),
                stmt("INSERT INTO nope VALUES (1)", vec![]),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.starts_with("statement 1: ")),
        "{e:?}"
    );
    assert_eq!(count(&store, &a, "t"), 0);

    // The writer is usable again and a good batch commits.
    let results = store
        .execute_batch(
            &a,
            vec![
                stmt("INSERT INTO t(v) VALUES (?)", vec![text("one")]),
                stmt("INSERT INTO t(v) VALUES (?)", vec![text("two")]),
                stmt("UPDATE t SET v = v || '!'", vec![]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        results,
        vec![
            ExecuteResult {
                rows_affected: 1,
                last_insert_id: Some(1)
            },
            ExecuteResult {
                rows_affected: 1,
                last_insert_id: Some(2)
            },
            ExecuteResult {
                rows_affected: 2,
                last_insert_id: None
            },
        ]
    );
    assert_eq!(count(&store, &a, "t"), 2);
    assert_eq!(store.execute_batch(&a, vec![]).await.unwrap(), vec![]);
}

#[tokio::test]
async fn pragmas_are_refused() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    for sql in [
        "PRAGMA journal_mode=DELETE",
        "PRAGMA journal_mode",
        "PRAGMA synchronous=OFF",
        "PRAGMA main.synchronous=0",
        "PRAGMA foreign_keys=OFF",
        "PRAGMA writable_schema=ON",
        "PRAGMA query_only=1",
        "PRAGMA database_list",
        "PRAGMA page_size=1024",
        "SELECT * FROM pragma_database_list",
        "SELECT * FROM pragma_table_info('t')",
    ] {
        let q = store.query(&a, sql, vec![]);
        assert!(is_invalid(&q), "query {sql}: {q:?}");
        let e = store.execute(&a, sql.into(), vec![]).await;
        assert!(is_invalid(&e), "execute {sql}: {e:?}");
    }
    let e = store
        .execute(&a, "PRAGMA synchronous=OFF".into(), vec![])
        .await
        .unwrap_err();
    assert_eq!(
        message(&e),
        "not authorized: PRAGMA synchronous is not allowed"
    );
    // The settings did not change.
    let db = store.inner.database(&a).unwrap();
    let mut writer = db.writer.lock().unwrap();
    writer
        .conn
        .authorizer(None::<fn(AuthContext<'_>) -> Authorization>)
        .unwrap();
    let mode: String = writer
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = writer
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
}

use rusqlite::hooks::{AuthContext, Authorization};

#[tokio::test]
async fn connections_are_locked_down() {
    use rusqlite::config::DbConfig;
    use rusqlite::limits::Limit;
    let (dir, _store) = store();
    let path = dir.path().join("x.db");
    let limits = StoreLimits::default();
    for role in [Role::Writer, Role::Reader] {
        let c = conn::open(&path, role, &limits).unwrap();
        assert_eq!(c.conn.limit(Limit::SQLITE_LIMIT_ATTACHED).unwrap(), 0);
        assert!(
            c.conn
                .db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE)
                .unwrap()
        );
        assert!(
            !c.conn
                .db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA)
                .unwrap()
        );
        let mut c = c;
        c.conn
            .authorizer(None::<fn(AuthContext<'_>) -> Authorization>)
            .unwrap();
        let fk: i64 = c
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let sync: i64 = c
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        let mode: String = c
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(c.conn.is_readonly("main").unwrap(), role == Role::Reader);
        // Extension loading is off at the C level too.
        assert!(
            c.conn
                .execute_batch("SELECT load_extension('/nonexistent')")
                .is_err()
        );
    }
}

#[tokio::test]
async fn transaction_control_and_temp_objects_are_refused() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    for sql in [
        "BEGIN",
        "BEGIN IMMEDIATE",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT s",
        "RELEASE s",
        "CREATE TEMP TABLE tt(x)",
        "CREATE TEMP VIEW tv AS SELECT 1",
        "CREATE TEMP TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END",
        "CREATE VIRTUAL TABLE d USING dbstat",
        "SELECT load_extension('x')",
    ] {
        let e = store.execute(&a, sql.into(), vec![]).await;
        assert!(is_invalid(&e), "execute {sql}: {e:?}");
        assert!(is_invalid(&store.query(&a, sql, vec![])), "query {sql}");
    }
    // A write after a refused BEGIN is still committed on its own.
    exec(&store, &a, "INSERT INTO t VALUES (1)").await;
    assert_eq!(count(&store, &a, "t"), 1);
}

#[tokio::test]
async fn full_text_search_and_rtree_work() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE VIRTUAL TABLE docs USING fts5(body)").await;
    exec(
        &store,
        &a,
        "INSERT INTO docs(body) VALUES ('the quick brown fox')",
    )
    .await;
    exec(&store, &a, "INSERT INTO docs(body) VALUES ('lazy dogs')").await;
    let r = store
        .query(
            &a,
            "SELECT body FROM docs WHERE docs MATCH ?",
            vec![text("quick")],
        )
        .unwrap();
    assert_eq!(r.rows, vec![vec![text("the quick brown fox")]]);
    exec(
        &store,
        &a,
        "CREATE VIRTUAL TABLE boxes USING rtree(id, x0, x1)",
    )
    .await;
    exec(&store, &a, "INSERT INTO boxes VALUES (1, 0, 10)").await;
    let r = store
        .query(&a, "SELECT id FROM boxes WHERE x0 <= 5 AND x1 >= 5", vec![])
        .unwrap();
    assert_eq!(r.rows, vec![vec![SqlValue::Integer(1)]]);
}

#[tokio::test]
async fn multiple_statements_are_refused() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    let e = store
        .execute(&a, "INSERT INTO t VALUES (1); DROP TABLE t".into(), vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("one SQL statement")),
        "{e:?}"
    );
    let e = store.query(&a, "SELECT 1; SELECT 2", vec![]).unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    assert_eq!(count(&store, &a, "t"), 0);
    // A trailing semicolon or comment is one statement.
    exec(&store, &a, "INSERT INTO t VALUES (1); -- done").await;
    assert_eq!(count(&store, &a, "t"), 1);
    for empty in ["", "   ", "-- nothing", ";"] {
        assert!(
            is_invalid(&store.execute(&a, empty.into(), vec![]).await),
            "{empty:?}"
        );
        assert!(is_invalid(&store.query(&a, empty, vec![])), "{empty:?}");
    }
}

#[tokio::test]
async fn oversized_parameters_are_refused_before_writing() {
    let limits = StoreLimits {
        max_value_bytes: 1024,
        ..StoreLimits::default()
    };
    let (_dir, store) = open(limits);
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    let e = store
        .execute(
            &a,
            "INSERT INTO t VALUES (?)".into(),
            vec![SqlValue::Blob(vec![7; 1025])],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    // The total counts, not each value.
    let e = store
        .execute(
            &a,
            "INSERT INTO t VALUES (?), (?)".into(),
            vec![text(&"a".repeat(600)), text(&"b".repeat(600))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    let e = store
        .execute_batch(
            &a,
            vec![
                SqlStatement {
                    sql: "INSERT INTO t VALUES (1)".into(),
                    params: vec![],
                },
                SqlStatement {
                    sql: "INSERT INTO t VALUES (?)".into(),
                    params: vec![SqlValue::Blob(vec![7; 2000])],
                },
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.starts_with("statement 1: ")),
        "{e:?}"
    );
    assert_eq!(count(&store, &a, "t"), 0);
    // Exactly at the limit is fine.
    store
        .execute(
            &a,
            "INSERT INTO t VALUES (?)".into(),
            vec![SqlValue::Blob(vec![7; 1024])],
        )
        .await
        .unwrap();
    assert_eq!(count(&store, &a, "t"), 1);
}

#[tokio::test]
async fn results_are_capped() {
    let limits = StoreLimits {
        max_rows: 10,
        max_result_bytes: 1000,
        ..StoreLimits::default()
    };
    let (_dir, store) = open(limits);
    let a = ns("a");
    let rows = |n: u32| {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c"
        )
    };
    assert_eq!(store.query(&a, &rows(10), vec![]).unwrap().rows.len(), 10);
    let e = store.query(&a, &rows(11), vec![]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Limit(m) if m.contains("10 rows")),
        "{e:?}"
    );
    let e = store
        .query(
            &a,
            "SELECT zeroblob(600) UNION ALL SELECT zeroblob(600)",
            vec![],
        )
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Limit(m) if m.contains("1000 bytes")),
        "{e:?}"
    );
    // A single value beyond SQLite's length limit (64 KiB floor here).
    let e = store
        .query(&a, "SELECT zeroblob(100000)", vec![])
        .unwrap_err();
    assert!(matches!(e, StoreError::Limit(_)), "{e:?}");
    // The reader pool is still healthy.
    assert_eq!(store.query(&a, "SELECT 1", vec![]).unwrap().rows.len(), 1);
}

#[tokio::test]
async fn statements_time_out() {
    let limits = StoreLimits {
        statement_timeout: Duration::from_millis(200),
        ..StoreLimits::default()
    };
    let (_dir, store) = open(limits);
    let a = ns("a");
    let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)";
    let e = store
        .query(&a, &format!("{endless} SELECT count(*) FROM c"), vec![])
        .unwrap_err();
    assert_eq!(e, StoreError::Limit("statement exceeded 200ms".into()));

    exec(&store, &a, "CREATE TABLE t(x)").await;
    let e = store
        .execute(
            &a,
            format!("{endless} INSERT INTO t SELECT x FROM c"),
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(e, StoreError::Limit("statement exceeded 200ms".into()));
    assert_eq!(count(&store, &a, "t"), 0);

    let e = store
        .execute_batch(
            &a,
            vec![
                SqlStatement {
                    sql: "INSERT INTO t VALUES (1)".into(),
                    params: vec![],
                },
                SqlStatement {
                    sql: format!("{endless} INSERT INTO t SELECT x FROM c"),
                    params: vec![],
                },
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(
        e,
        StoreError::Limit("statement 1: statement exceeded 200ms".into())
    );
    assert_eq!(count(&store, &a, "t"), 0);
    // The budget is per statement: quick work right after is fine.
    exec(&store, &a, "INSERT INTO t VALUES (1)").await;
    assert_eq!(count(&store, &a, "t"), 1);
}

#[tokio::test]
async fn writes_are_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = ns("a");
    {
        let store = SqliteStore::open(dir.path(), StoreLimits::default()).unwrap();
        exec(&store, &a, "CREATE TABLE t(x)").await;
        store
            .execute(&a, "INSERT INTO t VALUES (?)".into(), vec![text("kept")])
            .await
            .unwrap();
    }
    let store = SqliteStore::open(dir.path(), StoreLimits::default()).unwrap();
    let r = store.query(&a, "SELECT x FROM t", vec![]).unwrap();
    assert_eq!(r.rows, vec![vec![text("kept")]]);
}

#[tokio::test]
async fn query_refuses_writes_and_execute_refuses_rows() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(id INTEGER PRIMARY KEY, x)").await;
    for sql in [
        "INSERT INTO t(x) VALUES (1)",
        "UPDATE t SET x = 2",
        "DELETE FROM t",
        "CREATE TABLE u(x)",
        "INSERT INTO t(x) VALUES (1) RETURNING id",
    ] {
        let e = store.query(&a, sql, vec![]).unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid(m) if m.contains("use execute")),
            "{sql}: {e:?}"
        );
    }
    assert_eq!(count(&store, &a, "t"), 0);
    for sql in [
        "SELECT * FROM t",
        "INSERT INTO t(x) VALUES (1) RETURNING id",
        "VALUES (1)",
    ] {
        let e = store.execute(&a, sql.into(), vec![]).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid(m) if m.contains("use query")),
            "{sql}: {e:?}"
        );
    }
    assert_eq!(
        count(&store, &a, "t"),
        0,
        "RETURNING refused before it wrote"
    );
}

#[tokio::test]
async fn last_insert_id_is_honest() {
    let (_dir, store) = store();
    let a = ns("a");
    let r = exec(
        &store,
        &a,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT UNIQUE, v)",
    )
    .await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 0,
            last_insert_id: None
        }
    );
    let r = exec(&store, &a, "INSERT INTO t(k, v) VALUES ('a', 1)").await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 1,
            last_insert_id: Some(1)
        }
    );
    let r = exec(&store, &a, "INSERT INTO t(k, v) VALUES ('b', 1), ('c', 1)").await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 2,
            last_insert_id: Some(3)
        }
    );
    let r = exec(&store, &a, "UPDATE t SET v = 2").await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 3,
            last_insert_id: None
        }
    );
    // DDL after DML reports no stale count.
    let r = exec(&store, &a, "CREATE INDEX tv ON t(v)").await;
    assert_eq!(r.rows_affected, 0);
    // Upsert that updated: a row changed but none was inserted.
    let r = exec(
        &store,
        &a,
        "INSERT INTO t(k, v) VALUES ('a', 9) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
    )
    .await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 1,
            last_insert_id: None
        }
    );
    let r = exec(&store, &a, "INSERT OR IGNORE INTO t(k, v) VALUES ('a', 0)").await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 0,
            last_insert_id: None
        }
    );
    exec(
        &store,
        &a,
        "CREATE TABLE w(k TEXT PRIMARY KEY, v) WITHOUT ROWID",
    )
    .await;
    let r = exec(&store, &a, "INSERT INTO w VALUES ('x', 1)").await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 1,
            last_insert_id: None
        }
    );
    let r = exec(
        &store,
        &a,
        "WITH n(x) AS (SELECT 'z') INSERT INTO t(k) SELECT x FROM n",
    )
    .await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 1,
            last_insert_id: Some(4)
        }
    );
    let r = exec(&store, &a, "DELETE FROM t WHERE k = 'z'").await;
    assert_eq!(
        r,
        ExecuteResult {
            rows_affected: 1,
            last_insert_id: None
        }
    );
}

#[tokio::test]
async fn errors_are_classified() {
    let (dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE p(id INTEGER PRIMARY KEY)").await;
    exec(
        &store,
        &a,
        "CREATE TABLE c(p INTEGER REFERENCES p(id), u UNIQUE)",
    )
    .await;
    // Foreign keys are enforced.
    let e = store
        .execute(&a, "INSERT INTO c(p) VALUES (42)".into(), vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict(m) if m.contains("FOREIGN KEY")),
        "{e:?}"
    );
    exec(&store, &a, "INSERT INTO c(u) VALUES (1)").await;
    let e = store
        .execute(&a, "INSERT INTO c(u) VALUES (1)".into(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    let e = store.query(&a, "SELEC 1", vec![]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("syntax error")),
        "{e:?}"
    );
    let e = store.query(&a, "SELECT ?", vec![]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("1 parameters")),
        "{e:?}"
    );
    let e = store
        .query(&a, "SELECT 1", vec![SqlValue::Integer(1)])
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    let e = store
        .execute(&a, "INSERT INTO c(u) VALUES (?, ?)".into(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    let e = store
        .query(&a, "SELECT * FROM missing", vec![])
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    // A value of the wrong type for a STRICT column (SQLite reports it as
    // SQLITE_CONSTRAINT_DATATYPE) is a malformed argument.
    exec(&store, &a, "CREATE TABLE s(n INTEGER CHECK (n > 0)) STRICT").await;
    let e = store
        .execute(&a, "INSERT INTO s VALUES (?)".into(), vec![text("x")])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("cannot store TEXT")),
        "{e:?}"
    );
    let e = store
        .execute(&a, "INSERT INTO s VALUES (-1)".into(), vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict(m) if m.contains("CHECK")),
        "{e:?}"
    );
    // A statement too big for SQLite's value length limit.
    let e = store
        .execute(
            &a,
            "INSERT INTO c(u) SELECT zeroblob(1 << 30)".into(),
            vec![],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Limit(_)), "{e:?}");
    let base = dir.path().display().to_string();
    for e in [
        store
            .query(&a, "SELECT * FROM missing", vec![])
            .unwrap_err(),
        store
            .execute(&a, "ATTACH 'x' AS y".into(), vec![])
            .await
            .unwrap_err(),
    ] {
        assert!(!message(&e).contains(&base), "{e:?}");
    }
}

#[tokio::test]
async fn reads_see_committed_writes_and_run_concurrently() {
    let (_dir, store) = store();
    let store = Arc::new(store);
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    let mut tasks = Vec::new();
    for i in 0..8i64 {
        let store = store.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            store
                .execute(
                    &a,
                    "INSERT INTO t VALUES (?)".into(),
                    vec![SqlValue::Integer(i)],
                )
                .await
                .unwrap();
            store.query(&a, "SELECT count(*) FROM t", vec![]).unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&store, &a, "t"), 8);
    // A table created after readers were pooled is visible to them.
    exec(&store, &a, "CREATE TABLE later(y)").await;
    assert_eq!(count(&store, &a, "later"), 0);
}

#[tokio::test]
async fn ordinary_schema_work_is_allowed() {
    let (_dir, store) = store();
    let a = ns("a");
    for sql in [
        "CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT, y)",
        "CREATE INDEX tx ON t(x)",
        "CREATE UNIQUE INDEX ty ON t(y) WHERE y IS NOT NULL",
        "CREATE TABLE log(msg TEXT)",
        "CREATE TRIGGER tlog AFTER INSERT ON t BEGIN INSERT INTO log VALUES ('inserted ' || new.x); END",
        "CREATE VIEW v AS SELECT x FROM t",
        "INSERT INTO t(x) VALUES ('a')",
        "ALTER TABLE t ADD COLUMN z DEFAULT 0",
        "ALTER TABLE t RENAME COLUMN z TO w",
        "ALTER TABLE t DROP COLUMN w",
        "ALTER TABLE log RENAME TO events",
        "ANALYZE",
        "REINDEX tx",
        "DROP VIEW v",
        "DROP INDEX ty",
    ] {
        exec(&store, &a, sql).await;
    }
    let r = store.query(&a, "SELECT msg FROM events", vec![]).unwrap();
    assert_eq!(r.rows, vec![vec![text("inserted a")]]);
    let r = store
        .query(
            &a,
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name",
            vec![],
        )
        .unwrap();
    assert!(r.rows.contains(&vec![text("events")]), "{r:?}");
    exec(&store, &a, "DROP TABLE t").await;
}

/// `(file name, bytes)` of every file of the store's directory.
fn sql_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir.join("sql"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect()
}

fn files_with(dir: &std::path::Path, marker: &str) -> Vec<String> {
    sql_files(dir)
        .into_iter()
        .filter(|(_, b)| b.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .map(|(n, _)| n)
        .collect()
}

fn user_table(table: &str, column: &str) -> UserTable {
    UserTable {
        table: table.into(),
        column: column.into(),
    }
}

const ALICE_ROWS: [&str; 5] = [
    "MARKER-ALICE-NOTE-1-4e2a",
    "MARKER-ALICE-NOTE-2-8b3c",
    "MARKER-ALICE-OLD-9d0e",
    "MARKER-ALICE-NEW-1f2a",
    "MARKER-ALICE-ODD-3b4c",
];
const KEEP_ROWS: [&str; 3] = [
    "MARKER-KEEP-NOTE-BOB-7c1d",
    "MARKER-KEEP-NOTE-ALICE2-5e6f",
    "MARKER-KEEP-ODD-BOB-7a8b",
];

#[tokio::test]
async fn erase_user_rows_leaves_no_byte_of_the_user_in_any_file() {
    let (dir, store) = store();
    let a = ns("a");
    exec(
        &store,
        &a,
        "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT, body TEXT)",
    )
    .await;
    exec(&store, &a, "CREATE INDEX notes_owner ON notes(owner)").await;
    exec(
        &store,
        &a,
        r#"CREATE TABLE "odd""name"(who TEXT, what TEXT)"#,
    )
    .await;
    let insert = |sql: &str, who: &str, what: &str| {
        store.execute(&a, sql.into(), vec![text(who), text(what)])
    };
    let note = "INSERT INTO notes(owner, body) VALUES (?, ?)";
    let odd = r#"INSERT INTO "odd""name" VALUES (?, ?)"#;
    insert(note, "alice", "MARKER-ALICE-NOTE-1-4e2a")
        .await
        .unwrap();
    insert(note, "bob", "MARKER-KEEP-NOTE-BOB-7c1d")
        .await
        .unwrap();
    insert(note, "alice2", "MARKER-KEEP-NOTE-ALICE2-5e6f")
        .await
        .unwrap();
    insert(note, "alice", "MARKER-ALICE-OLD-9d0e")
        .await
        .unwrap();
    // Part of it checkpointed into the database file, the rest only in
    // the WAL; an update leaves the old value in freed space.
    {
        let db = store.inner.database(&a).unwrap();
        let writer = db.writer.lock().unwrap();
        writer
            .conn
            .wal_checkpoint_v2(
                Some(rusqlite::MAIN_DB),
                rusqlite::wal::CheckpointMode::PASSIVE,
            )
            .unwrap();
    }
    store
        .execute(
            &a,
            "UPDATE notes SET body = ? WHERE body = ?".into(),
            vec![text("MARKER-ALICE-NEW-1f2a"), text("MARKER-ALICE-OLD-9d0e")],
        )
        .await
        .unwrap();
    insert(note, "alice", "MARKER-ALICE-NOTE-2-8b3c")
        .await
        .unwrap();
    insert(odd, "alice", "MARKER-ALICE-ODD-3b4c").await.unwrap();
    insert(odd, "bob", "MARKER-KEEP-ODD-BOB-7a8b")
        .await
        .unwrap();
    for m in ALICE_ROWS.iter().chain(&KEEP_ROWS) {
        assert!(!files_with(dir.path(), m).is_empty(), "{m} not written");
    }

    let tables = vec![
        user_table("notes", "owner"),
        user_table("no_such_table", "owner"),
        user_table("odd\"name", "who"),
    ];
    let exported = store.export_user_rows(&a, &tables, "alice").unwrap();
    let bodies: Vec<(&str, Vec<&SqlValue>)> = exported
        .iter()
        .map(|(t, r)| {
            (
                t.as_str(),
                r.rows
                    .iter()
                    .map(|row| &row[2.min(row.len() - 1)])
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        bodies,
        [
            (
                "notes",
                vec![
                    &text("MARKER-ALICE-NOTE-1-4e2a"),
                    &text("MARKER-ALICE-NEW-1f2a"),
                    &text("MARKER-ALICE-NOTE-2-8b3c"),
                ]
            ),
            ("odd\"name", vec![&text("MARKER-ALICE-ODD-3b4c")]),
        ]
    );
    assert_eq!(exported[0].1.columns, ["id", "owner", "body"]);
    assert_eq!(exported[1].1.columns, ["who", "what"]);

    let deleted = store
        .erase_user_rows(&a, tables.clone(), "alice".into())
        .await
        .unwrap();
    assert_eq!(deleted, 4);
    assert_eq!(count(&store, &a, "notes"), 2);
    assert_eq!(count(&store, &a, r#""odd""name""#), 1);
    for m in ALICE_ROWS {
        assert_eq!(files_with(dir.path(), m), Vec::<String>::new(), "{m}");
    }
    for m in KEEP_ROWS {
        assert!(!files_with(dir.path(), m).is_empty(), "{m} vanished");
    }
    let names: Vec<String> = sql_files(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"a.db".to_string()), "{names:?}");
    assert_eq!(
        std::fs::metadata(dir.path().join("sql/a.db-wal")).map_or(0, |m| m.len()),
        0,
        "the WAL is truncated"
    );

    // Idempotent; nothing of hers to export.
    assert_eq!(
        store
            .erase_user_rows(&a, tables.clone(), "alice".into())
            .await
            .unwrap(),
        0
    );
    let exported = store.export_user_rows(&a, &tables, "alice").unwrap();
    assert!(exported.iter().all(|(_, r)| r.rows.is_empty()));
    // A component without a database: nothing, and no file is created.
    assert_eq!(
        store
            .erase_user_rows(&ns("never"), tables.clone(), "alice".into())
            .await
            .unwrap(),
        0
    );
    assert!(
        store
            .export_user_rows(&ns("never"), &tables, "alice")
            .unwrap()
            .is_empty()
    );
    assert!(!dir.path().join("sql/never.db").exists());
}

#[tokio::test]
async fn erase_user_rows_checks_identifiers_and_changes_nothing_on_error() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(owner TEXT, v TEXT)").await;
    exec(&store, &a, "INSERT INTO t VALUES ('alice', 'x')").await;
    for tables in [
        vec![user_table("", "owner")],
        vec![user_table("t", "")],
        vec![user_table("t\0x", "owner")],
        vec![user_table("t", "own\0er")],
        // Only the first exists; the second's column does not: all or none.
        vec![user_table("t", "owner"), user_table("t", "nope")],
        // Not the string 'alice' (SQLite's double-quoted literals), which
        // would equal the user id in every row.
        vec![user_table("t", "alice")],
    ] {
        let r = store
            .erase_user_rows(&a, tables.clone(), "alice".into())
            .await;
        assert!(is_invalid(&r), "{tables:?}: {r:?}");
        assert!(is_invalid(
            &store.export_user_rows(&a, &tables, "alice").map(|_| ())
        ));
    }
    assert!(is_invalid(
        &store
            .erase_user_rows(&a, vec![user_table("t", "owner")], String::new())
            .await
    ));
    assert_eq!(count(&store, &a, "t"), 1);
    // The user id is bound, never spliced into the SQL.
    let sneaky = "alice' OR '1'='1";
    assert_eq!(
        store
            .erase_user_rows(&a, vec![user_table("t", "owner")], sneaky.into())
            .await
            .unwrap(),
        0
    );
    assert_eq!(count(&store, &a, "t"), 1);
}

#[tokio::test]
async fn a_reader_holding_the_wal_makes_erasure_unavailable_until_it_lets_go() {
    let (dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(owner TEXT, v TEXT)").await;
    exec(
        &store,
        &a,
        "INSERT INTO t VALUES ('alice', 'MARKER-ALICE-HELD-2c3d')",
    )
    .await;
    // A read transaction pins the WAL (as a long query would).
    let held = rusqlite::Connection::open(dir.path().join("sql/a.db")).unwrap();
    held.execute_batch("BEGIN").unwrap();
    let n: i64 = held
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    let tables = vec![user_table("t", "owner")];
    let started = std::time::Instant::now();
    let err = store
        .erase_user_rows(&a, tables.clone(), "alice".into())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded wait");
    // The rows are deleted all the same; erasing again finishes the job.
    assert_eq!(count(&store, &a, "t"), 0);
    drop(held);
    assert_eq!(
        store
            .erase_user_rows(&a, tables, "alice".into())
            .await
            .unwrap(),
        0
    );
    assert!(files_with(dir.path(), "MARKER-ALICE-HELD-2c3d").is_empty());
}

#[tokio::test]
async fn guests_still_cannot_turn_secure_delete_off() {
    let (_dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    for sql in [
        "PRAGMA secure_delete=OFF",
        "PRAGMA secure_delete",
        "PRAGMA wal_checkpoint(TRUNCATE)",
    ] {
        let e = store.execute(&a, sql.into(), vec![]).await;
        assert!(is_invalid(&e), "execute {sql}: {e:?}");
        assert!(is_invalid(&store.query(&a, sql, vec![])), "query {sql}");
    }
    let e = store
        .execute(&a, "PRAGMA secure_delete=OFF".into(), vec![])
        .await
        .unwrap_err();
    assert_eq!(
        message(&e),
        "not authorized: PRAGMA secure_delete is not allowed"
    );
    let db = store.inner.database(&a).unwrap();
    let mut writer = db.writer.lock().unwrap();
    writer
        .conn
        .authorizer(None::<fn(AuthContext<'_>) -> Authorization>)
        .unwrap();
    let on: i64 = writer
        .conn
        .query_row("PRAGMA secure_delete", [], |r| r.get(0))
        .unwrap();
    assert_eq!(on, 1);
}

#[tokio::test]
async fn the_wal_index_is_shared_in_memory_between_writer_and_readers() {
    let (dir, store) = store();
    let a = ns("a");
    exec(&store, &a, "CREATE TABLE t(x)").await;
    exec(&store, &a, "INSERT INTO t VALUES (1)").await;
    assert_eq!(count(&store, &a, "t"), 1);
    // The pooled reader sees a commit made after it last read: the
    // writer's WAL index is the one it reads.
    exec(&store, &a, "INSERT INTO t VALUES (2)").await;
    assert_eq!(count(&store, &a, "t"), 2);
    let sql = dir.path().join("sql");
    assert!(sql.join("a.db-wal").exists(), "WAL mode");
    // `unix-excl`: no `-shm` file, so no `fcntl` read-mark locks per read.
    assert!(!sql.join("a.db-shm").exists(), "WAL index on the heap");
}

#[tokio::test]
async fn prepared_statements_return_flat_rows_and_check_what_query_and_execute_check() {
    let limits = StoreLimits {
        max_rows: 10,
        max_result_bytes: 1000,
        statement_timeout: Duration::from_millis(200),
        ..StoreLimits::default()
    };
    let (_dir, store) = open(limits);
    let a = ns("a");
    exec(
        &store,
        &a,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)",
    )
    .await;
    exec(&store, &a, "INSERT INTO t(name) VALUES ('a'), ('b'), ('c')").await;

    // Rows come back flat, as many values per row as there are columns.
    let select = store
        .prepare(
            &a,
            "SELECT id, name FROM t WHERE id >= ?1 ORDER BY id".into(),
        )
        .unwrap();
    assert_eq!(select.columns, ["id", "name"]);
    let values = store
        .query_prepared(&a, &select, vec![SqlValue::Integer(2)])
        .unwrap();
    assert_eq!(
        values,
        [
            SqlValue::Integer(2),
            text("b"),
            SqlValue::Integer(3),
            text("c")
        ]
    );
    // The same statement runs again with other parameters, and sees writes
    // made since it was prepared.
    exec(&store, &a, "INSERT INTO t(name) VALUES ('d')").await;
    let values = store
        .query_prepared(&a, &select, vec![SqlValue::Integer(4)])
        .unwrap();
    assert_eq!(values, [SqlValue::Integer(4), text("d")]);
    assert!(
        store.query_prepared(&a, &select, vec![]).is_err_and(
            |e| matches!(&e, StoreError::Invalid(m) if m.contains("takes 1 parameters"))
        )
    );

    // What prepare refuses, it refuses as query or execute would.
    for (sql, expected) in [
        ("", "empty SQL statement"),
        ("SELEC 1", "syntax error"),
        ("SELECT * FROM missing", "no such table"),
        ("PRAGMA user_version", "not allowed"),
        ("ATTACH 'x.db' AS x", "not allowed"),
        ("SELECT 1; SELECT 2", "one SQL statement"),
    ] {
        let e = store.prepare(&a, sql.into()).unwrap_err();
        assert!(
            matches!(&e, StoreError::Invalid(m) if m.contains(expected)),
            "{sql}: {e:?}"
        );
    }

    // A write prepares (for execute) but never runs as a query.
    let insert = store
        .prepare(&a, "INSERT INTO t(name) VALUES (?1)".into())
        .unwrap();
    assert!(insert.columns.is_empty());
    let e = store
        .query_prepared(&a, &insert, vec![text("x")])
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("use execute")),
        "{e:?}"
    );
    let returning = store
        .prepare(&a, "INSERT INTO t(name) VALUES (?1) RETURNING id".into())
        .unwrap();
    assert_eq!(returning.columns, ["id"]);
    let e = store
        .query_prepared(&a, &returning, vec![text("x")])
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("use execute")),
        "{e:?}"
    );
    assert_eq!(count(&store, &a, "t"), 4, "nothing written by a query");
    let r = store
        .execute(&a, insert.sql.clone(), vec![text("e")])
        .await
        .unwrap();
    assert_eq!(r.rows_affected, 1);

    // The caps of query.
    let rows = |n: u32| {
        format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT x FROM c"
        )
    };
    let ten = store.prepare(&a, rows(10)).unwrap();
    assert_eq!(store.query_prepared(&a, &ten, vec![]).unwrap().len(), 10);
    let eleven = store.prepare(&a, rows(11)).unwrap();
    let e = store.query_prepared(&a, &eleven, vec![]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Limit(m) if m.contains("10 rows")),
        "{e:?}"
    );
    let big = store
        .prepare(
            &a,
            "SELECT zeroblob(600) UNION ALL SELECT zeroblob(600)".into(),
        )
        .unwrap();
    let e = store.query_prepared(&a, &big, vec![]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Limit(m) if m.contains("1000 bytes")),
        "{e:?}"
    );
    let endless = store
        .prepare(
            &a,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
                .into(),
        )
        .unwrap();
    let e = store.query_prepared(&a, &endless, vec![]).unwrap_err();
    assert_eq!(e, StoreError::Limit("statement exceeded 200ms".into()));

    // A schema change that changes the statement's columns is reported,
    // never answered with rows of another width.
    let star = store
        .prepare(&a, "SELECT * FROM t WHERE id = 1".into())
        .unwrap();
    assert_eq!(star.columns, ["id", "name"]);
    assert_eq!(store.query_prepared(&a, &star, vec![]).unwrap().len(), 2);
    exec(&store, &a, "ALTER TABLE t ADD COLUMN extra").await;
    let e = store.query_prepared(&a, &star, vec![]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid(m) if m.contains("prepare it again")),
        "{e:?}"
    );
    let star = store
        .prepare(&a, "SELECT * FROM t WHERE id = 1".into())
        .unwrap();
    assert_eq!(
        store.query_prepared(&a, &star, vec![]).unwrap(),
        [SqlValue::Integer(1), text("a"), SqlValue::Null]
    );
}
