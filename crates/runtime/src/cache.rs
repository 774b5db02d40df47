//! Compiled-artifact cache: `<data-dir>/compiled/<sha256>-<engine>.cwasm`.
//!
//! Only files this process wrote are ever deserialized (deserializing is
//! `unsafe`: a tampered artifact is native code). The engine part of the
//! name changes with wasmtime version and every codegen-relevant setting.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

pub struct ArtifactCache<'a> {
    engine: &'a Engine,
    /// Compiles on a miss ([`crate::engine::compiler_for`]); created on the
    /// first miss, dropped with the cache once the components are loaded.
    compiler: std::sync::OnceLock<Engine>,
    dir: PathBuf,
    engine_key: String,
}

impl<'a> ArtifactCache<'a> {
    pub fn new(engine: &'a Engine, data_dir: &Path) -> Self {
        // DefaultHasher::new() uses fixed keys: stable across runs of one build.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        ArtifactCache {
            engine,
            compiler: std::sync::OnceLock::new(),
            dir: data_dir.join("compiled"),
            engine_key: format!("{:016x}", h.finish()),
        }
    }

    fn path_for(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_key))
    }

    /// Returns the component and whether it came from the cache. A cache
    /// that cannot be read or written only costs a compile.
    pub fn load_or_compile(
        &self,
        digest: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, bool)> {
        let path = self.path_for(digest);
        if path.is_file() {
            // SAFETY: the file name carries the sha256 of the source and the
            // engine hash, and the directory is ours (written below, renamed
            // into place atomically).
            match unsafe { Component::deserialize_file(self.engine, &path) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled artifact");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let compiler = match self.compiler.get() {
            Some(c) => c,
            None => {
                let c = crate::engine::compiler_for(self.engine)?;
                self.compiler.get_or_init(|| c)
            }
        };
        let compiled = compiler.precompile_component(bytes)?;
        if let Err(e) = self.store(&path, &compiled) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write compiled artifact; continuing without cache");
        }
        // SAFETY: `compiled` was produced just now by an engine with this
        // engine's configuration.
        let c = unsafe { Component::deserialize(self.engine, &compiled)? };
        Ok((c, false))
    }

    fn store(&self, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, compiled)?;
        std::fs::rename(&tmp, path)
    }
}
