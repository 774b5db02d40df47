//! `make demo`: the global chat on a loopback multi-region deployment.
//!
//! 3 regions x 2 edges (us-east: nyc, bos; eu-west: ams, lon; ap-south:
//! bom, sin), one nats-server per region joined by gateways, every config
//! rendered from a regions.toml as `keel topology` does. Every edge serves
//! the chat (`components/chat`) and the operator dashboard; the URLs are
//! printed. Runs until Ctrl-C, then stops every process it started and
//! removes their temp dirs (nodes also die with this process).
//!
//! Env: `KEEL_BIN` (default: the `keel` next to this binary's target dir),
//! `KEEL_DEMO_JWT_SECRET` (the chat's token secret; `make demo` sets a
//! development default), `KEEL_NATS_SERVER`.

use anyhow::Context as _;
use std::time::Duration;
use tier_bench::{
    DEMO_EDGES, DEMO_REGIONS, Node, Topology, chat_components, check_interrupted, keel_bin,
    wait_connected, watch_signals,
};

fn main() -> anyhow::Result<()> {
    let components = chat_components()?;
    let bin = match std::env::var_os("KEEL_BIN") {
        Some(b) => b.into(),
        None => keel_bin()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(watch_signals())?;
    eprintln!("== starting nats: 3 regions x 1 server, joined by gateways");
    let topology = Topology::start("demo", DEMO_REGIONS, false)?;
    let mut nodes = Vec::new();
    for edge in DEMO_EDGES {
        check_interrupted()?;
        eprintln!("== starting keel {edge}");
        nodes.push(
            Node::start(&bin, &topology, edge, &components)
                .with_context(|| format!("starting edge {edge}"))?,
        );
    }
    rt.block_on(async {
        for n in &nodes {
            wait_connected(n).await?;
        }
        anyhow::Ok(())
    })?;
    println!(
        "\nKeel demo: the global chat on 3 regions x 2 edges (regions.toml: {})\n",
        topology.path.display()
    );
    for (region, edges) in DEMO_REGIONS {
        println!("{region}:");
        for e in *edges {
            let n = nodes.iter().find(|n| n.edge == *e).expect("started above");
            println!(
                "  {e:<4} chat http://{}/chat/   dashboard http://{}/_keel/ui",
                n.addr, n.addr
            );
        }
    }
    println!("\nSign in as two users on edges of different regions. Ctrl-C stops everything.");
    while check_interrupted().is_ok() {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("== stopping");
    drop(nodes);
    drop(topology);
    Ok(())
}
