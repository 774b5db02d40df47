//! Edge-tier benchmark, run by `benches/edge.sh` (numbers go to
//! BENCHMARKS.md; nothing is asserted). Every guest figure has a native
//! baseline measured in the same run:
//!
//! - `kv.get` / `kv.set` through a guest (edge-probe, N calls per request so
//!   HTTP is amortised) vs the rocksdb crate called directly;
//! - `sql.query` through a guest, ad hoc and through a prepared statement,
//!   vs rusqlite called directly, with its default VFS and with keel's
//!   `unix-excl`;
//! - `record-local-event` durable appends with 64 concurrent writers (group
//!   commit) vs one fsync per event.
//!
//! Each row alternates keel and its baseline for [`ROUNDS`] rounds.
//!
//! Usage: edge-bench <keel-binary> <edge-probe.wasm> [seconds per side per round, default 1]
//!
//! `edge-bench fsync-latency <appends> <gap-µs>` prints instead the baseline
//! of a durable write's latency with one request in flight: `fdatasync` of
//! one 300 B append at a time, `gap` apart (the time a request spends
//! elsewhere). An idle thread waiting on the disk wakes later than a busy
//! one, so the disk's own tail depends on that gap.
//!
//! `edge-bench jwt <secret> <user>` prints an HS256 bearer token for `user`
//! signed with `secret`, valid for an hour (the `authenticate-user` row).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_store::{EventData, EventLog, Namespace, StoreLimits};
use keel_test_support::KeelProcess;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// Rounds per row: keel and its baseline alternate, so each round's ratio
/// compares measurements taken next to each other (this box's speed drifts
/// by 30 % and more between runs).
const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("fsync-latency") {
        let appends: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3000);
        let gap: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(300);
        return fsync_latency(appends, Duration::from_micros(gap));
    }
    if args.get(1).map(String::as_str) == Some("jwt") {
        anyhow::ensure!(args.len() == 4, "usage: edge-bench jwt <secret> <user>");
        println!("{}", hs256_token(&args[2], &args[3])?);
        return Ok(());
    }
    anyhow::ensure!(
        args.len() >= 3,
        "usage: edge-bench <keel-binary> <edge-probe.wasm> [seconds per side per round]"
    );
    let secs: f64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let window = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (keel, base) = start_keel(Path::new(&args[1]), Path::new(&args[2]), d)?;
    println!(
        "| measurement | keel (guest), median | native, median | ratio, median | ratio of each round |"
    );
    println!("|---|---:|---:|---:|---|");

    paired(
        "kv.get 16 B (ops/s)",
        || rt.block_on(guest_ops(&base, "kv-get", 1000, window)),
        || native_kv_get(d, window),
    )?;
    paired(
        "kv.set 16 B, fsynced (ops/s)",
        || rt.block_on(guest_ops(&base, "kv-set", 100, window)),
        || native_kv_set(d, window),
    )?;
    paired(
        "sql.query by primary key (ops/s)",
        || rt.block_on(guest_ops(&base, "sql-query", 1000, window)),
        || native_sql_query(d, SqliteLocking::Default, window),
    )?;
    // Like for like: keel opens its databases with `unix-excl` (no `fcntl`
    // per read); native code can do the same.
    paired(
        "sql.query by primary key vs native with keel's `unix-excl` VFS (ops/s)",
        || rt.block_on(guest_ops(&base, "sql-query", 1000, window)),
        || native_sql_query(d, SqliteLocking::ProcessExclusive, window),
    )?;
    // The same query through a statement the guest prepared once: no SQL
    // text per call, the row's values as one flat list.
    paired(
        "sql.query by primary key, prepared statement (ops/s)",
        || rt.block_on(guest_ops(&base, "sql-prepared", 1000, window)),
        || native_sql_query(d, SqliteLocking::Default, window),
    )?;
    paired(
        "sql.query by primary key, prepared statement, vs native with keel's `unix-excl` VFS (ops/s)",
        || rt.block_on(guest_ops(&base, "sql-prepared", 1000, window)),
        || native_sql_query(d, SqliteLocking::ProcessExclusive, window),
    )?;
    // Where the guest's difference is: the store layer (limits, reader
    // pool, typed values) alone, called natively.
    paired(
        "sql.query by primary key, SqliteStore called natively, no guest, vs native with `unix-excl` (ops/s)",
        || rt.block_on(store_sql_query(d, window)),
        || native_sql_query(d, SqliteLocking::ProcessExclusive, window),
    )?;
    drop(keel);

    paired(
        "durable event appends, 64 writers: group commit vs fsync per event (events/s)",
        || rt.block_on(group_commit(&d.join("grouped"), 64, window)),
        || native_fsync_per_event(d, window),
    )?;
    paired(
        "durable event appends, 1 writer vs fsync per event (events/s)",
        || rt.block_on(group_commit(&d.join("single"), 1, window)),
        || native_fsync_per_event(d, window),
    )?;
    Ok(())
}

fn paired(
    name: &str,
    mut keel: impl FnMut() -> anyhow::Result<f64>,
    mut native: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    let (mut k, mut n, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (a, b) = (keel()?, native()?);
        k.push(a);
        n.push(b);
        ratios.push(a / b);
    }
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "| {name} | {:.0} | {:.0} | {:.2} | {} |",
        median(&k),
        median(&n),
        median(&ratios),
        each.join(", ")
    );
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts keel on a fresh config in `dir`; `base` is the component's URL prefix.
fn start_keel(bin: &Path, wasm: &Path, dir: &Path) -> anyhow::Result<(KeelProcess, String)> {
    let config = dir.join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata-dir = \"keel-data\"\n\n[components.probe]\nwasm = {:?}\nroute = \"/probe/...\"\ngrants = [\"kv\", \"sql\", \"events\", \"edge-operations\"]\n",
            wasm.display().to_string()
        ),
    )?;
    let keel = KeelProcess::start(bin, &config)?;
    let base = format!("{}/probe", keel.base);
    Ok((keel, base))
}

/// Ops/s of `POST /bench/<op>?n=N` from one connection for `window`.
async fn guest_ops(base: &str, op: &str, n: u64, window: Duration) -> anyhow::Result<f64> {
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let url: hyper::Uri = format!("{base}/bench/{op}?n={n}").parse()?;
    let call = || async {
        let req = hyper::Request::post(url.clone()).body(Full::new(Bytes::new()))?;
        let res = client.request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "{op}: {status} {body:?}");
        Ok::<_, anyhow::Error>(())
    };
    // Warm up (first instantiation, table creation, caches).
    for _ in 0..3 {
        call().await?;
    }
    let started = Instant::now();
    let mut ops = 0u64;
    while started.elapsed() < window {
        call().await?;
        ops += n;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

fn rocks(path: &Path) -> anyhow::Result<rocksdb::DB> {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    Ok(rocksdb::DB::open(&o, path)?)
}

fn native_kv_get(dir: &Path, window: Duration) -> anyhow::Result<f64> {
    let db = rocks(&dir.join("native-get"))?;
    for i in 0..100 {
        db.put(format!("probe\0bench-{i}"), [7u8; 16])?;
    }
    let started = Instant::now();
    let mut ops = 0u64;
    while started.elapsed() < window {
        for i in 0..1000 {
            std::hint::black_box(db.get(format!("probe\0bench-{}", i % 100))?);
        }
        ops += 1000;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

fn native_kv_set(dir: &Path, window: Duration) -> anyhow::Result<f64> {
    let db = rocks(&dir.join("native-set"))?;
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    let started = Instant::now();
    let mut ops = 0u64;
    while started.elapsed() < window {
        for i in 0..100 {
            db.put_opt(format!("probe\0bench-{i}"), [7u8; 16], &sync)?;
        }
        ops += 100;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

/// How the native baseline's SQLite connection locks its files.
#[derive(Clone, Copy)]
enum SqliteLocking {
    /// rusqlite's default (`unix` VFS): two `fcntl` calls per WAL read.
    Default,
    /// `unix-excl`, as keel's store opens its databases.
    ProcessExclusive,
}

fn native_sql_query(dir: &Path, locking: SqliteLocking, window: Duration) -> anyhow::Result<f64> {
    let conn = match locking {
        SqliteLocking::Default => rusqlite::Connection::open(dir.join("native.db"))?,
        SqliteLocking::ProcessExclusive => rusqlite::Connection::open_with_flags_and_vfs(
            dir.join("native-excl.db"),
            rusqlite::OpenFlags::default(),
            "unix-excl",
        )?,
    };
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, value BLOB NOT NULL)",
    )?;
    for i in 0..100 {
        conn.execute(
            "INSERT OR REPLACE INTO bench (id, value) VALUES (?1, ?2)",
            rusqlite::params![i, vec![7u8; 16]],
        )?;
    }
    let started = Instant::now();
    let mut ops = 0u64;
    while started.elapsed() < window {
        for i in 0..1000i64 {
            // What the guest's query returns: one BLOB column.
            let mut stmt = conn.prepare_cached("SELECT value FROM bench WHERE id = ?1")?;
            let rows: Vec<Vec<u8>> = stmt
                .query_map([i % 100], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            std::hint::black_box(rows);
        }
        ops += 1000;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

/// The same query through `keel-store-sqlite` (what the host calls for a
/// guest), without the guest.
async fn store_sql_query(dir: &Path, window: Duration) -> anyhow::Result<f64> {
    use keel_store::{SqlStatement, SqlStore, SqlValue};
    let store =
        keel_store_sqlite::SqliteStore::open(&dir.join("store-sql"), StoreLimits::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ns = Namespace::new("bench").expect("valid namespace");
    let mut statements = vec![SqlStatement {
        sql: "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v BLOB NOT NULL)".into(),
        params: vec![],
    }];
    for i in 0..100 {
        statements.push(SqlStatement {
            sql: "INSERT OR REPLACE INTO bench (id, v) VALUES (?1, ?2)".into(),
            params: vec![SqlValue::Integer(i), SqlValue::Blob(vec![7; 16])],
        });
    }
    store
        .execute_batch(&ns, statements)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let mut ops = 0u64;
    while started.elapsed() < window {
        for i in 0..1000i64 {
            let r = store
                .query(
                    &ns,
                    "SELECT v FROM bench WHERE id = ?1",
                    vec![SqlValue::Integer(i % 100)],
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            std::hint::black_box(r);
        }
        ops += 1000;
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

/// Prints p50 / p99 of `fdatasync` after appending 300 B, one append every
/// `gap`, as a row of `benches/edge.sh`'s latency table.
fn fsync_latency(appends: usize, gap: Duration) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("appends"))?;
    let mut took = Vec::with_capacity(appends);
    for _ in 0..appends {
        file.write_all(&[7u8; 300])?;
        let started = Instant::now();
        file.sync_data()?;
        took.push(started.elapsed());
        // The workload's think time, not a synchronisation.
        std::thread::sleep(gap);
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "| baseline: `fdatasync` of a 300 B append, one every {} µs | 1 | | {}us | {}us |",
        gap.as_micros(),
        at(0.5).as_micros(),
        at(0.99).as_micros()
    );
    Ok(())
}

/// An HS256 JWT for `user`, expiring in an hour.
fn hs256_token(secret: &str, user: &str) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({ "sub": user, "iat": now, "exp": now + 3600 });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

fn native_fsync_per_event(dir: &Path, window: Duration) -> anyhow::Result<f64> {
    let db = rocks(&dir.join("native-events"))?;
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < window {
        db.put_opt(n.to_be_bytes(), [7u8; 64], &sync)?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn group_commit(dir: &Path, writers: usize, window: Duration) -> anyhow::Result<f64> {
    let store = keel_store_rocksdb::RocksStore::open(
        dir,
        keel_store_rocksdb::RocksOptions {
            limits: StoreLimits::default(),
            node: keel_store_rocksdb::NodeIdentity {
                edge: "bench".into(),
                region: "bench".into(),
            },
            forwarding: true,
            block_cache_bytes: 8 << 20,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::new(store);
    let ns = Namespace::new("bench").expect("valid namespace");
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (store, ns, count) = (store.clone(), ns.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < window {
                let e = EventData {
                    kind: "bench".into(),
                    key: "k".into(),
                    payload: vec![7; 64],
                    content_type: None,
                    user: None,
                };
                store.append(&ns, e, true).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, keel_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
