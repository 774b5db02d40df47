//! `keel`: the command line. Everything else lives in `crates/`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keel_config::KeelConfig;
use keel_telemetry::{LogFormat, Metrics};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Single-binary edge runtime for WebAssembly components"
)]
struct Cli {
    /// Log format: auto (pretty on a TTY, JSON otherwise), pretty, json.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "pretty", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the components of a keel.toml.
    Up {
        /// Node configuration.
        #[arg(short, long, default_value = "keel.toml", env = "KEEL_CONFIG")]
        config: PathBuf,
        /// Override `[server] listen` (e.g. 127.0.0.1:0 for a free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Validate a keel.toml and every component's imports against its
    /// grants, without serving.
    Check {
        #[arg(short, long, default_value = "keel.toml", env = "KEEL_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keel_telemetry::init_logging(match cli.log_format.as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        _ => LogFormat::Auto,
    });
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Up { config, listen } => match up(&config, listen) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Exit code for configuration problems (distinct from runtime failure).
const EXIT_CONFIG: u8 = 2;

fn load_config(path: &std::path::Path) -> Result<KeelConfig, ExitCode> {
    KeelConfig::load(path).map_err(|d| {
        eprintln!("{d}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match keel_runtime::check(&config) {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for l in lines {
                let _ = writeln!(out, "ok: {l}");
            }
            let _ = writeln!(out, "{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(d) => {
            eprintln!("{d}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn up(path: &std::path::Path, listen: Option<std::net::SocketAddr>) -> anyhow::Result<ExitCode> {
    let mut config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if let Some(l) = listen {
        config.server.listen = l;
    }
    let metrics = Arc::new(Metrics::new());
    let services = match keel_runtime::Services::open(&config, &metrics) {
        Ok(s) => s,
        Err(d) => {
            eprintln!("{d}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let runtime = match keel_runtime::Runtime::load(&config, &metrics, Some(services)) {
        Ok(r) => Arc::new(r),
        Err(d) => {
            eprintln!("{d}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    for c in runtime.components() {
        tracing::info!(
            component = c.name(),
            route = %c.config.route,
            from_cache = c.from_cache,
            load_ms = c.load_time.as_secs_f64() * 1000.0,
            "component loaded"
        );
    }
    let server = keel_http::Server::bind(&config.server, runtime, metrics)
        .with_context(|| format!("binding {}", config.server.listen))?;
    let addr = server.local_addr();
    let shutdown = server.shutdown_handle();
    spawn_signal_handler(shutdown.clone())?;
    tracing::info!(%addr, "serving");
    // A stable line on stdout for scripts and tests that start `keel up`
    // with port 0.
    println!("keel listening on http://{addr}");
    let _ = std::io::stdout().flush();
    server.run(&shutdown)?;
    tracing::info!("drained; exiting");
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM / SIGINT start a graceful drain.
fn spawn_signal_handler(shutdown: keel_http::ShutdownHandle) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("keel-signals".into())
        .spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    tracing::error!("cannot install signal handlers");
                    return;
                };
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = int.recv() => tracing::info!("SIGINT: draining"),
                }
                shutdown.shutdown();
            })
        })?;
    Ok(())
}
