//! `xtask guests`: build the guest workspace in `components/` for
//! `wasm32-unknown-unknown` and componentize every guest (every member with a
//! `cdylib` target) into `components/target/wasm/<package-name>.wasm`.
//!
//! Toolchain: rustup's `wasm32-unknown-unknown` target when it is installed,
//! otherwise Debian's `rustc-web`/`cargo-web`/`rust-web-src` with
//! `-Zbuild-std` and `lld-19`'s `wasm-ld-19`. One cargo invocation builds all guests so they share one
//! build of std. A guest is componentized again only when its core module's
//! sha256 differs from the one recorded next to the output.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest as _, Sha256};

const TARGET: &str = "wasm32-unknown-unknown";
/// Part of the recorded input hash: bump it when the componentization step
/// changes (encoder version or options), so existing outputs are rebuilt.
const ENCODER_TAG: &str = "wit-component-0.254/validate";
const DEBIAN_PACKAGES: &str = "rustc-web cargo-web rust-web-src lld-19";
/// Linkers for the Debian route, best first.
const WASM_LINKERS: &[&str] = &[
    "wasm-ld-19",
    "wasm-ld-20",
    "wasm-ld-21",
    "wasm-ld-22",
    "wasm-ld",
];

#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile (the default).
    #[arg(long, conflicts_with = "debug")]
    release: bool,
    /// Build with the dev profile instead of release.
    #[arg(long)]
    debug: bool,
    /// Pass --locked to cargo (fail if components/Cargo.lock is out of date).
    #[arg(long)]
    locked: bool,
    /// Guests to build (package names under components/); default: all.
    names: Vec<String>,
}

/// The checkout to build: the nearest ancestor of the working directory with
/// `components/Cargo.toml` and `xtask/`. Not `CARGO_MANIFEST_DIR`: one xtask
/// binary in a shared target dir serves several checkouts (CI clones).
fn repo_root() -> Result<std::path::PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .find(|d| d.join("components/Cargo.toml").is_file() && d.join("xtask").is_dir())
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "{} is not inside a Keel checkout (no components/Cargo.toml above it)",
                cwd.display()
            )
        })
}

pub fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    let root = repo_root()?;
    let components = root.join("components");
    let manifest = components.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} not found: the guest workspace is missing",
            manifest.display()
        );
    }
    let target_dir = match std::env::var_os("KEEL_GUEST_TARGET_DIR") {
        // Relative to where xtask was started, not to components/.
        Some(dir) if !dir.is_empty() => std::env::current_dir()?.join(dir),
        _ => components.join("target").join("guest"),
    };
    let out_dir = components.join("target").join("wasm");
    let ui = Ui::new();

    let toolchain = Toolchain::detect()?;
    ui.line(format!("guest toolchain: {}", toolchain.describe()));

    let guests = list_guests(&toolchain, &components, &manifest)?;
    let selected: Vec<&Guest> = if options.names.is_empty() {
        guests.values().collect()
    } else {
        options
            .names
            .iter()
            .map(|name| {
                guests.get(name).ok_or_else(|| {
                    anyhow!(
                        "no guest named `{name}` in {}; guests: {}",
                        manifest.display(),
                        guests.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    if selected.is_empty() {
        bail!(
            "{} has no cdylib members: nothing to build",
            manifest.display()
        );
    }

    let modules = cargo_build(&ui, &toolchain, options, &manifest, &target_dir, &selected)?;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let written = componentize(&ui, &selected, &modules, &out_dir)?;
    ui.line(format!(
        "guests: {} ready ({written} componentized) in {:.1}s -> {}",
        selected.len(),
        started.elapsed().as_secs_f64(),
        out_dir.display()
    ));
    Ok(())
}

/// A member of the guest workspace that produces a core wasm module.
#[derive(Debug)]
struct Guest {
    /// Package name; also the output file stem (`wasi-everything`).
    name: String,
    manifest_path: PathBuf,
}

/// How to run the guest cargo.
struct Toolchain {
    cargo: PathBuf,
    /// Extra environment: empty for rustup, RUSTC/RUSTC_BOOTSTRAP/RUSTFLAGS
    /// for the Debian route.
    env: Vec<(&'static str, String)>,
    build_std: bool,
}

impl Toolchain {
    fn detect() -> Result<Toolchain> {
        // rustup (or any toolchain) that ships a prebuilt wasm32 std.
        let prebuilt_std = sysroot(Path::new("rustc")).is_some_and(|sysroot| {
            sysroot
                .join("lib/rustlib")
                .join(TARGET)
                .join("lib")
                .is_dir()
        });
        if prebuilt_std {
            return Ok(Toolchain {
                cargo: "cargo".into(),
                env: Vec::new(),
                build_std: false,
            });
        }
        // Debian: rustc-web + cargo-web + rust-web-src + lld, std from source.
        let (rustc, cargo) = (Path::new("/usr/bin/rustc"), Path::new("/usr/bin/cargo"));
        let mut missing = Vec::new();
        let std_src = sysroot(rustc).map(|s| s.join("lib/rustlib/src/rust/library"));
        if !cargo.is_file() {
            missing.push("/usr/bin/cargo (cargo-web)".to_string());
        }
        match &std_src {
            None => missing.push("/usr/bin/rustc (rustc-web)".to_string()),
            Some(src) if !src.join("std").is_dir() => {
                missing.push(format!("{} (rust-web-src)", src.display()))
            }
            Some(_) => {}
        }
        let linker = WASM_LINKERS.iter().find(|l| which(l).is_some());
        if linker.is_none() {
            missing.push("wasm-ld-19 (lld-19)".to_string());
        }
        if let (true, Some(linker)) = (missing.is_empty(), linker) {
            return Ok(Toolchain {
                cargo: cargo.into(),
                env: vec![
                    ("RUSTC", rustc.display().to_string()),
                    ("RUSTC_BOOTSTRAP", "1".to_string()),
                    ("RUSTFLAGS", format!("-C linker={linker}")),
                ],
                build_std: true,
            });
        }
        bail!(
            "no Rust toolchain that can build {TARGET} guests.\n\
             Fix one of:\n  \
             - rustup: `rustup target add {TARGET}`\n  \
             - Debian: `sudo apt-get install {DEBIAN_PACKAGES}` (missing: {})",
            missing.join(", ")
        )
    }

    fn describe(&self) -> String {
        if self.build_std {
            let linker = self
                .env
                .iter()
                .find(|(k, _)| *k == "RUSTFLAGS")
                .map(|(_, v)| v.as_str());
            format!(
                "{} with -Zbuild-std ({})",
                self.cargo.display(),
                linker.unwrap_or_default()
            )
        } else {
            format!(
                "{} with the installed {TARGET} target",
                self.cargo.display()
            )
        }
    }

    /// A cargo command with the variables that an outer `cargo run` (or the
    /// user's shell) set for the host build removed, so that they cannot leak
    /// into the guest build.
    fn command(&self, components: &Path) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(components);
        for (key, _) in std::env::vars_os() {
            if leaks_into_guest_build(&key) {
                cmd.env_remove(&key);
            }
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        cmd
    }
}

fn leaks_into_guest_build(key: &OsStr) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    if key.starts_with("CARGO") {
        return !KEEP.iter().any(|keep| key.starts_with(keep));
    }
    matches!(
        key,
        "RUSTUP_TOOLCHAIN"
            | "RUSTC"
            | "RUSTC_WRAPPER"
            | "RUSTC_WORKSPACE_WRAPPER"
            | "RUSTC_BOOTSTRAP"
            | "RUSTDOC"
            | "RUSTFLAGS"
            | "RUSTDOCFLAGS"
            | "MAKEFLAGS"
            | "MFLAGS"
    ) || key.starts_with("__CARGO")
}

fn sysroot(rustc: &Path) -> Option<PathBuf> {
    let mut cmd = Command::new(rustc);
    cmd.args(["--print", "sysroot"]).stderr(Stdio::null());
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// Members of the guest workspace that have a `cdylib` target, by name.
fn list_guests(
    toolchain: &Toolchain,
    components: &Path,
    manifest: &Path,
) -> Result<BTreeMap<String, Guest>> {
    let out = toolchain
        .command(components)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", toolchain.cargo.display()))?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed for {}:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cannot parse `cargo metadata` output")?;
    let mut guests = BTreeMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let is_guest = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|target| {
                target["kind"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|kind| kind == "cdylib")
            });
        if let (true, Some(name), Some(manifest_path)) = (
            is_guest,
            package["name"].as_str(),
            package["manifest_path"].as_str(),
        ) {
            let guest = Guest {
                name: name.to_string(),
                manifest_path: manifest_path.into(),
            };
            guests.insert(guest.name.clone(), guest);
        }
    }
    Ok(guests)
}

/// Runs one `cargo build` for the selected guests and returns the core module
/// path of each, by guest name.
fn cargo_build(
    ui: &Ui,
    toolchain: &Toolchain,
    options: &Options,
    manifest: &Path,
    target_dir: &Path,
    guests: &[&Guest],
) -> Result<BTreeMap<String, PathBuf>> {
    let components = manifest.parent().unwrap_or(Path::new("."));
    let mut cmd = toolchain.command(components);
    cmd.args([
        "build",
        "--target",
        TARGET,
        "--message-format",
        "json-render-diagnostics",
    ])
    .arg("--manifest-path")
    .arg(manifest)
    .arg("--target-dir")
    .arg(target_dir);
    if !options.debug {
        cmd.arg("--release");
    }
    if options.locked {
        cmd.arg("--locked");
    }
    if toolchain.build_std {
        cmd.arg("-Zbuild-std=std,panic_abort");
    }
    for guest in guests {
        cmd.args(["-p", &guest.name]);
    }
    let command_line = toolchain
        .env
        .iter()
        .map(|(key, value)| format!("{key}={value:?}"))
        .chain([cmd.get_program().to_string_lossy().into_owned()])
        .chain(cmd.get_args().map(|arg| arg.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let spinner = ui.spinner("cargo build (guests)");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", toolchain.cargo.display()))?;

    // cargo's human-readable output (progress, diagnostics) arrives on stderr:
    // show it as the spinner message, keep it for a failure report.
    let stderr_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr_thread = {
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::clone(&stderr_lines);
        let spinner = spinner.clone();
        let plain = !ui.tty;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if plain {
                    eprintln!("{line}");
                } else if !line.trim().is_empty() {
                    spinner.set_message(line.trim().to_string());
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        })
    };

    // Machine-readable messages arrive on stdout: collect the cdylib outputs.
    let by_manifest: BTreeMap<&Path, &str> = guests
        .iter()
        .map(|g| (g.manifest_path.as_path(), g.name.as_str()))
        .collect();
    let mut modules = BTreeMap::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(name) = message["manifest_path"]
            .as_str()
            .and_then(|p| by_manifest.get(Path::new(p)))
        else {
            continue;
        };
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"));
        if let Some(wasm) = wasm {
            modules.insert(name.to_string(), PathBuf::from(wasm));
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    stderr_thread.join().ok();
    spinner.finish_and_clear();

    if !status.success() {
        if ui.tty {
            for line in stderr_lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                eprintln!("{line}");
            }
        }
        bail!(
            "building the guests failed ({status}); cargo's output is above.\n\
             command (in {}): {command_line}\n\
             Fix the compile error; if the toolchain itself fails, either \
             `rustup target add {TARGET}` or `sudo apt-get install {DEBIAN_PACKAGES}`.",
            components.display()
        );
    }
    for guest in guests {
        if !modules.contains_key(&guest.name) {
            bail!(
                "cargo built `{}` but reported no .wasm file for it; is it a `cdylib`?",
                guest.name
            );
        }
    }
    Ok(modules)
}

/// Componentizes every guest whose core module changed since the last run.
/// Returns how many components were written.
fn componentize(
    ui: &Ui,
    guests: &[&Guest],
    modules: &BTreeMap<String, PathBuf>,
    out_dir: &Path,
) -> Result<usize> {
    let bar = ui.bar(guests.len() as u64);
    let mut written = 0;
    for guest in guests {
        bar.set_message(guest.name.clone());
        let module_path = &modules[&guest.name];
        let module = std::fs::read(module_path)
            .with_context(|| format!("cannot read {}", module_path.display()))?;
        let hash = hex::encode(
            Sha256::new()
                .chain_update(ENCODER_TAG)
                .chain_update(&module)
                .finalize(),
        );
        let output = out_dir.join(format!("{}.wasm", guest.name));
        let hash_file = out_dir.join(format!("{}.wasm.input-sha256", guest.name));
        let up_to_date = output.is_file()
            && std::fs::read_to_string(&hash_file).is_ok_and(|recorded| recorded.trim() == hash);
        if !up_to_date {
            let component = wit_component::ComponentEncoder::default()
                .module(&module)
                .and_then(|encoder| encoder.validate(true).encode())
                .with_context(|| {
                    format!(
                        "componentizing `{}` ({}) failed. A guest must be a cdylib that exports \
                         its world with `wasip2::http::proxy::export!` or \
                         `wit_bindgen::generate!` + `export!`, and import only WIT interfaces",
                        guest.name,
                        module_path.display()
                    )
                })?;
            write_atomically(&output, &component)?;
            write_atomically(&hash_file, format!("{hash}\n").as_bytes())?;
            written += 1;
            ui.line_above(
                &bar,
                format!(
                    "componentized {:<16} {:>7} KiB -> {}",
                    guest.name,
                    component.len().div_ceil(1024),
                    output.display()
                ),
            );
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(written)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Spinner and bars on a terminal, plain lines otherwise.
struct Ui {
    tty: bool,
}

impl Ui {
    fn new() -> Ui {
        Ui {
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, line: String) {
        eprintln!("{line}");
    }

    fn line_above(&self, bar: &ProgressBar, line: String) {
        if self.tty {
            bar.suspend(|| eprintln!("{line}"))
        } else {
            eprintln!("{line}")
        }
    }

    fn spinner(&self, message: &'static str) -> ProgressBar {
        if !self.tty {
            eprintln!("{message}");
            return ProgressBar::hidden();
        }
        let spinner = ProgressBar::new_spinner().with_message(message);
        spinner.set_style(
            ProgressStyle::with_template("{spinner:.cyan} [{elapsed}] {wide_msg}")
                .expect("valid template"),
        );
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner
    }

    fn bar(&self, len: u64) -> ProgressBar {
        if !self.tty {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("componentize [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar
    }
}
