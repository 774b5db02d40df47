//! Regional tier through guests, end to end, run by `benches/regional-op.sh`
//! (numbers go to BENCHMARKS.md; nothing is asserted). A real loopback
//! topology: 3 regions x 2 edges (us-east: nyc, bos; us-west: sfo, lax;
//! eu-central: fra, ams), one nats-server per region (gateways, one residency
//! zone), release `keel up` nodes for nyc, bos, sfo and fra serving
//! regional-probe at `/reg/...` (granted
//! what it imports: `regional-coordination`, `global-coordination` with its
//! default `global` feature, `edge-operations`, `kv`). Each
//! HTTP figure is measured over one keep-alive connection per node; the
//! baseline is measured in the same run on the same servers:
//!
//! 1. regional op, edge -> region -> edge: `POST /reg/activity/<user>` at
//!    nyc, then `GET /reg/user/<user>` at bos in a tight loop (no sleep)
//!    until `last_activity` is the new kind; from just before the POST until
//!    the successful poll;
//! 2. baseline: a raw async-nats core request/reply round trip between two
//!    connections (nyc's and bos's zone-account users) on the us-east server;
//! 3. subscription delivery: at bos a regional subscription to kind
//!    `bench`; `POST /reg/event` at nyc until bos's `GET /reg/deliveries`
//!    lists one more delivery (at most 200 samples: the listing grows);
//! 4. HTTP floor: `GET /reg/node` at bos, a guest call with no regional
//!    work; and `GET /reg/user/<known user>` at bos, the cost of one poll of
//!    (1).
//! 5. global event delivery nyc -> sfo; 6. global query (metric) at nyc,
//!    scatter-gather to the three regions; 7. `search-global-users` at nyc
//!    (name prefix, limit 20) over 100 users with display names in each
//!    region.
//!
//! Every child (nats-server, keel) is killed and every temp dir removed on
//! exit, error, panic or SIGINT/SIGTERM/SIGHUP (keel nodes also die with
//! this process: `PR_SET_PDEATHSIG`). Every wait has a deadline; a timeout
//! fails with the nodes' logs.
//!
//! Usage: regional-op [samples]   (default 500)
//! Env: `KEEL_BIN` (default `$CARGO_TARGET_DIR/release/keel`, else the
//! `keel` next to this binary), `KEEL_REGIONAL_PROBE` (default
//! `components/target/wasm/regional-probe.wasm`), `KEEL_LOG` of the nodes
//! (default `warn`), `KEEL_NATS_SERVER` (see keel-test-support).

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tier_bench::{
    Http, Node, Samples, Topology, WARMUP, check_interrupted, gets, guest_wasm, logs,
    raw_round_trip, run_bench, samples_arg, text, wait_connected,
};

/// us-east, then us-west; the first edge of a region is its coordinator.
const REGIONS: [(&str, &[&str]); 3] = [
    ("us-east", &["nyc", "bos"]),
    ("us-west", &["sfo", "lax"]),
    ("eu-central", &["fra", "ams"]),
];
/// The edges that run a keel node.
const NODES: [&str; 4] = ["nyc", "bos", "sfo", "fra"];
/// Deadline for one sample (a write to become visible on the other edge).
const SAMPLE_DEADLINE: Duration = Duration::from_secs(30);
/// Cap on subscription-delivery samples: each poll lists every delivery.
const MAX_DELIVERY_SAMPLES: usize = 200;
const ECHO_SUBJECT: &str = "bench.regional-op.echo";

fn main() -> anyhow::Result<()> {
    let samples = samples_arg("regional-op", 500)?;
    let wasm = guest_wasm("KEEL_REGIONAL_PROBE", "regional-probe")?;
    let components = format!(
        "[components.reg]\nwasm = {:?}\nroute = \"/reg/...\"\n\
         grants = [\"regional-coordination\", \"global-coordination\", \"edge-operations\", \"kv\"]\n",
        wasm.display().to_string()
    );
    run_bench(
        "regional-op",
        &REGIONS,
        false,
        &NODES,
        &components,
        async |topology, nodes| run(topology, nodes, samples).await,
    )
}

/// A write at one edge until a poll at the other shows it.
#[derive(Default)]
struct Propagation {
    total: Samples,
    /// The write's own request.
    write: Samples,
    /// The last, successful poll.
    last_poll: Samples,
    polls: u64,
    /// Statuses other than the expected ones while polling.
    odd_statuses: BTreeMap<u16, u64>,
    /// Samples whose poll found more deliveries but not the event just
    /// recorded.
    out_of_order: u64,
}

/// (1) `POST /reg/activity/<prefix>-<i>` at nyc until `GET /reg/user/..` at
/// bos has its kind as `last_activity`.
async fn regional_op(
    (nyc, bos): (&Node, &Node),
    (a, b): (&mut Http, &mut Http),
    prefix: &str,
    n: usize,
) -> anyhow::Result<Propagation> {
    let mut out = Propagation::default();
    for i in 0..n {
        check_interrupted()?;
        let user = format!("{prefix}-{i}");
        let kind = format!("k{i}");
        let body = json!({"kind": kind, "attributes": {}}).to_string();
        let poll = format!("/reg/user/{user}");
        let start = Instant::now();
        let (status, reply) = a
            .call("POST", &format!("/reg/activity/{user}"), body)
            .await?;
        out.write.push(start.elapsed());
        if status != 204 {
            bail!(
                "POST /reg/activity/{user} at nyc: {status} {}\n{}",
                text(&reply),
                logs(&[nyc])
            );
        }
        let deadline = start + SAMPLE_DEADLINE;
        loop {
            let t = Instant::now();
            let (status, reply) = b.call("GET", &poll, "").await?;
            out.polls += 1;
            if status == 200 {
                let v: Value = serde_json::from_slice(&reply)?;
                if v["last_activity"].as_str() == Some(kind.as_str()) {
                    let end = Instant::now();
                    out.total.push(end - start);
                    out.last_poll.push(end - t);
                    break;
                }
            } else if status != 404 {
                *out.odd_statuses.entry(status).or_default() += 1;
            }
            if Instant::now() > deadline {
                bail!(
                    "{user}'s activity {kind} not visible at bos within {SAMPLE_DEADLINE:?}; last GET {poll}: {status} {}\n{}",
                    text(&reply),
                    logs(&[nyc, bos])
                );
            }
            check_interrupted()?;
        }
    }
    Ok(out)
}

/// (2) Core request/reply between nyc's and bos's zone-account users on
/// the us-east server (bos's connection echoes).
/// (3) A regional subscription at bos to kind `bench`; `POST /reg/event` at
/// nyc until bos's deliveries list one more (the first `WARMUP.min(n)`
/// events unmeasured).
/// Which subscription [`delivery`] measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `record-local-event` → `subscribe-regional-updates` (same region).
    Regional,
    /// `publish-global-event` → `subscribe-global-events` (another region).
    Global,
}

async fn delivery(
    (nyc, bos): (&Node, &Node),
    (a, b): (&mut Http, &mut Http),
    n: usize,
    via: Via,
) -> anyhow::Result<Propagation> {
    let (subscribe, filter) = match via {
        Via::Regional => ("/reg/subscribe", json!({"kinds": ["bench"]})),
        Via::Global => ("/reg/global/subscribe", json!(["bench.>"])),
    };
    let (status, reply) = b.call("POST", subscribe, filter.to_string()).await?;
    if status != 200 {
        bail!(
            "POST {subscribe} at {}: {status} {}\n{}",
            bos.edge,
            text(&reply),
            logs(&[bos])
        );
    }
    let id = serde_json::from_slice::<Value>(&reply)?["id"]
        .as_u64()
        .with_context(|| format!("subscription id in {}", text(&reply)))?;
    let poll = match via {
        Via::Regional => format!("/reg/deliveries?prefix=update/{id:020}/"),
        Via::Global => format!("/reg/deliveries?prefix=global/{id:020}/"),
    };
    let warmup = WARMUP.min(n);
    let mut out = Propagation::default();
    let mut have = 0;
    for i in 0..warmup + n {
        check_interrupted()?;
        let key = format!("k{i}");
        let (write, body, field) = match via {
            Via::Regional => (
                "/reg/event",
                json!({"kind": "bench", "key": key, "payload": "p"}),
                "key",
            ),
            Via::Global => (
                "/reg/global/publish",
                json!({"id": key, "event_type": "bench.tick", "data": "p"}),
                "id",
            ),
        };
        let start = Instant::now();
        let (status, reply) = a.call("POST", write, body.to_string()).await?;
        let written = start.elapsed();
        if status != 200 && status != 204 {
            bail!(
                "POST {write} at nyc: {status} {}\n{}",
                text(&reply),
                logs(&[nyc])
            );
        }
        let deadline = start + SAMPLE_DEADLINE;
        loop {
            let t = Instant::now();
            let (status, reply) = b.call("GET", &poll, "").await?;
            let end = Instant::now();
            let list = if status == 200 {
                serde_json::from_slice::<Value>(&reply)?
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            } else {
                *out.odd_statuses.entry(status).or_default() += 1;
                Vec::new()
            };
            if i >= warmup {
                out.polls += 1;
            }
            if list.len() > have {
                have = list.len();
                if i >= warmup {
                    out.total.push(end - start);
                    out.write.push(written);
                    out.last_poll.push(end - t);
                    if !list.iter().any(|d| d[field].as_str() == Some(key.as_str())) {
                        out.out_of_order += 1;
                    }
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "delivery of {key} not recorded at {} within {SAMPLE_DEADLINE:?} ({have} so far); last GET {poll}: {status}\n{}",
                    bos.edge,
                    logs(&[nyc, bos])
                );
            }
            check_interrupted()?;
        }
    }
    Ok(out)
}

/// (6) `n` POSTs of `body` to `path` at `node` (after a warm-up), each
/// answered 200.
async fn posts(
    node: &Node,
    http: &mut Http,
    path: &str,
    body: &Value,
    n: usize,
) -> anyhow::Result<Samples> {
    let mut out = Samples::default();
    for i in 0..WARMUP + n {
        check_interrupted()?;
        let start = Instant::now();
        let (status, reply) = http.call("POST", path, body.to_string()).await?;
        let d = start.elapsed();
        if status != 200 {
            bail!(
                "POST {path} at {}: {status} {}\n{}",
                node.edge,
                text(&reply),
                node.log_text()
            );
        }
        if i >= WARMUP {
            out.push(d);
        }
    }
    Ok(out)
}

async fn run(topology: &Topology, nodes: &[Node], n: usize) -> anyhow::Result<()> {
    let (nyc, bos) = (&nodes[0], &nodes[1]);
    for node in nodes {
        wait_connected(node).await?;
    }
    let mut a = Http::new(nyc);
    let mut b = Http::new(bos);

    eprintln!("== 1. regional op: {WARMUP} warm-up + {n} samples");
    regional_op((nyc, bos), (&mut a, &mut b), "warm", WARMUP).await?;
    let op = regional_op((nyc, bos), (&mut a, &mut b), "user", n).await?;

    eprintln!("== 2. raw NATS round trip: {WARMUP} warm-up + {n} samples");
    let raw = raw_round_trip(topology, "nyc", "bos", ECHO_SUBJECT, n).await?;

    let nd = n.min(MAX_DELIVERY_SAMPLES);
    eprintln!(
        "== 3. subscription delivery: {} warm-up + {nd} samples",
        WARMUP.min(nd)
    );
    let sub = delivery((nyc, bos), (&mut a, &mut b), nd, Via::Regional).await?;

    let sfo = &nodes[2];
    let mut c = Http::new(sfo);
    eprintln!(
        "== 5. global event delivery nyc -> sfo: {} warm-up + {nd} samples",
        WARMUP.min(nd)
    );
    let global = delivery((nyc, sfo), (&mut a, &mut c), nd, Via::Global).await?;
    eprintln!("== 6. global query (metric, three regions): {WARMUP} warm-up + {n} samples");
    let query = posts(
        nyc,
        &mut a,
        "/reg/global/query",
        &json!({"metric": {"metric_type": "bench", "start_ms": 0, "end_ms": u64::MAX}}),
        n,
    )
    .await?;

    eprintln!(
        "== 7. search-global-users (three regions): 300 users, {WARMUP} warm-up + {n} samples"
    );
    for (i, node) in nodes.iter().enumerate().filter(|(i, _)| *i != 1) {
        let mut http = Http::new(node);
        for u in 0..100 {
            let body =
                json!({"kind": "sign-in", "attributes": {"display-name": format!("Srch {i} {u}")}});
            let (status, reply) = http
                .call(
                    "POST",
                    &format!("/reg/activity/srch-{i}-{u}"),
                    body.to_string(),
                )
                .await?;
            if status != 204 {
                bail!("activity at {}: {status} {}", node.edge, text(&reply));
            }
        }
    }
    let search_body = json!({"name_prefix": "srch", "limit": 20});
    // The three regions' views have the users once a search finds 20.
    let deadline = Instant::now() + SAMPLE_DEADLINE;
    loop {
        check_interrupted()?;
        let (_, reply) = a
            .call("POST", "/reg/global/search", search_body.to_string())
            .await?;
        let v: Value = serde_json::from_slice(&reply).unwrap_or_default();
        if v["users"].as_array().is_some_and(|u| u.len() == 20) && v["missing_regions"] == json!([])
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("search never found 20 users in every region: {v}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let search = posts(nyc, &mut a, "/reg/global/search", &search_body, n).await?;

    eprintln!("== 4. HTTP floor: {WARMUP} warm-up + {n} samples each");
    let floor = gets(bos, &mut b, "/reg/node", n).await?;
    let user_get = gets(bos, &mut b, "/reg/user/user-0", n).await?;

    let us = |s: f64| format!("{:.0}", s * 1e6);
    let row = |what: &str, samples: usize, s: &Samples, ratio: bool| {
        let r = if ratio {
            format!(
                "{:.1} / {:.1}",
                s.quantile(0.5) / raw.quantile(0.5),
                s.quantile(0.99) / raw.quantile(0.99)
            )
        } else {
            String::new()
        };
        println!(
            "| {what} | {samples} | {} | {} | {} | {} | {r} |",
            us(s.quantile(0.5)),
            us(s.quantile(0.99)),
            us(s.mean()),
            us(s.max())
        );
    };
    println!(
        "| measurement (loopback, 3 regions x 2 edges, 1 nats-server per region; µs) | samples | p50 | p99 | mean | max | keel / raw NATS round trip (p50 / p99) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    row(
        "regional op, edge -> region -> edge: POST /reg/activity/<user> at nyc until GET /reg/user/<user> at bos shows it",
        n,
        &op.total,
        true,
    );
    row(
        "... of which the POST at nyc (record-user-activity)",
        n,
        &op.write,
        false,
    );
    row(
        "... of which the last, successful GET /reg/user/<user> at bos",
        n,
        &op.last_poll,
        false,
    );
    row(
        "baseline: raw NATS core request/reply, nyc user -> bos user (echo), us-east server",
        n,
        &raw,
        true,
    );
    row(
        "subscription delivery: POST /reg/event at nyc until bos's on-updates is listed by GET /reg/deliveries",
        nd,
        &sub.total,
        true,
    );
    row(
        "... of which the POST at nyc (record-local-event)",
        nd,
        &sub.write,
        false,
    );
    row(
        &format!(
            "... of which the last, successful GET /reg/deliveries at bos (up to {nd} entries)"
        ),
        nd,
        &sub.last_poll,
        false,
    );
    row(
        "global op: publish-global-event at nyc (us-east) until sfo's (us-west) on-global-events is listed by GET /reg/deliveries",
        nd,
        &global.total,
        true,
    );
    row(
        "... of which the POST at nyc (publish-global-event: outbox write)",
        nd,
        &global.write,
        false,
    );
    row(
        "global op: query-global-state(metric) at nyc, scatter-gather to the three regions",
        n,
        &query,
        true,
    );
    row(
        "global op: search-global-users at nyc (name prefix, limit 20), scatter-gather to the three regions",
        n,
        &search,
        true,
    );
    row(
        "HTTP floor: GET /reg/node at bos (guest call, no regional work)",
        n,
        &floor,
        false,
    );
    row(
        "one poll of the regional op: GET /reg/user/<known user> at bos",
        n,
        &user_get,
        false,
    );
    println!();
    println!(
        "Polls per sample (mean): regional op {:.1}, subscription delivery {:.1}. \
         Warm-up samples before each measurement are not counted.",
        op.polls as f64 / n as f64,
        sub.polls as f64 / nd as f64
    );
    let mut odd = Vec::new();
    if !op.odd_statuses.is_empty() {
        odd.push(format!(
            "GET /reg/user statuses other than 200/404: {:?}",
            op.odd_statuses
        ));
    }
    if !sub.odd_statuses.is_empty() {
        odd.push(format!(
            "GET /reg/deliveries statuses other than 200: {:?}",
            sub.odd_statuses
        ));
    }
    if sub.out_of_order > 0 {
        odd.push(format!(
            "{} regional deliveries whose poll did not show the event just recorded",
            sub.out_of_order
        ));
    }
    if a.reconnects + b.reconnects > 0 {
        odd.push(format!(
            "keep-alive connections reopened: nyc {}, bos {}",
            a.reconnects, b.reconnects
        ));
    }
    for o in odd {
        println!("Note: {o}.");
    }
    Ok(())
}
