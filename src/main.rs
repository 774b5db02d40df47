//! `keel`: the command line. Everything else lives in `crates/`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keel_config::KeelConfig;
use keel_telemetry::{LogFormat, Metrics};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

mod memory;

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
        /// This node is this edge of a regions.toml deployment (overrides
        /// `[node] edge`); its region, NATS servers and credentials come from
        /// the regions.toml.
        #[arg(long, env = "KEEL_EDGE")]
        edge: Option<String>,
        /// The deployment's regions.toml (overrides `[node] regions`).
        #[arg(long, env = "KEEL_REGIONS")]
        regions: Option<PathBuf>,
    },
    /// Validate a keel.toml and every component's imports against its
    /// grants, without serving.
    Check {
        #[arg(short, long, default_value = "keel.toml", env = "KEEL_CONFIG")]
        config: PathBuf,
    },
    /// The audit trail of global and compliance operations.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Print (or write) the NATS server configs of a regions.toml: one
    /// cluster per region, gateways between them, an account per residency
    /// zone. Passwords are derived from the secret in an environment
    /// variable.
    Topology {
        /// The topology.
        #[arg(short, long, default_value = "regions.toml", env = "KEEL_REGIONS")]
        regions: PathBuf,
        /// Write `<server>.conf` per server and a README.txt into this
        /// directory instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Environment variable holding the secret (default: the
        /// regions.toml's `nats.secret_env`, else KEEL_NATS_SECRET).
        #[arg(long)]
        secret_env: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Read the whole hash chain the node of a keel.toml writes to (the
    /// global audit stream, or the embedded node's database) and check
    /// every record; exit 1 naming the first broken one.
    Verify {
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
        Command::Audit {
            action: AuditAction::Verify { config },
        } => audit_verify(&config),
        Command::Topology {
            regions,
            out,
            secret_env,
        } => topology(&regions, out.as_deref(), secret_env.as_deref()),
        Command::Up {
            config,
            listen,
            edge,
            regions,
        } => match up(&config, listen, edge, regions) {
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

/// `keel audit verify`: 0 intact, 1 broken or unreadable, 2 config.
fn audit_verify(path: &std::path::Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match keel_runtime::verify_audit(&config) {
        Ok(Ok(v)) => {
            println!("audit chain intact: {} records, head {}", v.records, v.head);
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("audit chain broken: {e}");
            ExitCode::FAILURE
        }
        Err(d) => {
            eprintln!("{d}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `keel topology`: config problems and a missing secret exit 2, write
/// failures 1.
fn topology(
    path: &std::path::Path,
    out: Option<&std::path::Path>,
    secret_env: Option<&str>,
) -> ExitCode {
    let regions = match keel_config::RegionsConfig::load(path) {
        Ok(r) => r,
        Err(d) => {
            eprintln!("{d}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let problems = keel_topology::validate(&regions);
    if !problems.is_empty() {
        for p in problems {
            eprintln!("error: {}: {p}", path.display());
        }
        return ExitCode::from(EXIT_CONFIG);
    }
    let var = secret_env.unwrap_or(regions.nats.secret_env.as_str());
    let secret = match std::env::var_os(var) {
        Some(v) if !v.is_empty() => v,
        _ => {
            eprintln!(
                "error: environment variable {var} is not set or empty: it must hold the secret \
                 every NATS password is derived from (set it, or name another variable with \
                 --secret-env or `secret_env` in [nats] of {})",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let secret = std::os::unix::ffi::OsStrExt::as_bytes(secret.as_os_str());
    let rendered = keel_topology::render(&regions, secret);
    let mut stdout = std::io::stdout().lock();
    match out {
        None => {
            for s in &rendered {
                let _ = writeln!(stdout, "# ---- {} ----", s.file_name());
                let _ = write!(stdout, "{}", s.config);
            }
        }
        Some(dir) => match keel_topology::write(dir, &rendered) {
            Ok(paths) => {
                for p in paths {
                    let _ = writeln!(stdout, "{}", p.display());
                }
            }
            Err(e) => {
                eprintln!("error: writing {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        },
    }
    if stdout.flush().is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn up(
    path: &std::path::Path,
    listen: Option<std::net::SocketAddr>,
    edge: Option<String>,
    regions: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let mut config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if (edge.is_some() || regions.is_some())
        && let Err(d) = config.place_node(edge, regions)
    {
        eprintln!("{d}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if let Some(l) = listen {
        config.server.listen = l;
    }
    memory::configure_malloc();
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
    let services = runtime.services().cloned();
    let server = keel_http::Server::bind(&config.server, runtime, metrics)
        .with_context(|| format!("binding {}", config.server.listen))?;
    // Starting freed a lot of heap and ran a lot of code serving never
    // runs again (see `memory`): from here on, keep what serving needs.
    memory::trim();
    memory::start_periodic_trim().context("starting the malloc trim thread")?;
    match memory::release_startup_code() {
        Ok(bytes) => tracing::debug!(bytes, "released the start's code pages"),
        Err(e) => tracing::debug!(error = %e, "cannot release the start's code pages"),
    }
    let addr = server.local_addr();
    let shutdown = server.shutdown_handle();
    spawn_signal_handler(shutdown.clone())?;
    tracing::info!(%addr, "serving");
    // A stable line on stdout for scripts and tests that start `keel up`
    // with port 0.
    println!("keel listening on http://{addr}");
    let _ = std::io::stdout().flush();
    server.run(&shutdown)?;
    if let Some(services) = services {
        services.stop_background();
    }
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
