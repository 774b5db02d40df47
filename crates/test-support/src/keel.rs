//! A `keel up` child process for benchmarks: started on a config whose
//! listener uses port 0, ready once it prints its address.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `keel up`, killed and reaped on drop.
pub struct KeelProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`, from keel's "keel listening on" line.
    pub base: String,
}

impl KeelProcess {
    /// Runs `<bin> up --config <config>` with warn-level JSON logs on stderr.
    pub fn start(bin: &Path, config: &Path) -> anyhow::Result<KeelProcess> {
        let mut child = Command::new(bin)
            .args(["--log-format", "json", "up", "--config"])
            .arg(config)
            .env_remove("RUST_BACKTRACE")
            .env("KEEL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("keel stdout is not piped"))?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("keel listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("unexpected keel output {line:?}");
        };
        Ok(KeelProcess {
            base: addr.to_string(),
            child,
        })
    }
}

impl Drop for KeelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
