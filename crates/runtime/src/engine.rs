//! The process's wasmtime `Engine` and its epoch ticker.

use keel_config::KeelConfig;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Epoch tick: the granularity of deadlines and of guest yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Benchmark-only switch (`KEEL_BENCH_DISABLE_LIMITS=1`): no epoch
/// interruption and no store limiter, to measure what limits cost
/// (BENCHMARKS.md). Logged loudly; never set it in production.
pub fn limits_disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        let off = std::env::var("KEEL_BENCH_DISABLE_LIMITS").is_ok_and(|v| v == "1");
        if off {
            tracing::warn!("KEEL_BENCH_DISABLE_LIMITS=1: deadlines and memory limits are OFF (benchmarking only)");
        }
        off
    })
}

/// Builds the engine sized for every component in `config`.
///
/// The defaults come from measurements (BENCHMARKS.md, research/tuned-host.md):
/// the dominant per-request cost of a pooled instance is the kernel work of
/// resetting its slot, so slots are reset by memset of dirty pages
/// (keep-resident + pagemap scan) and, unless `engine.guard-pages` is on,
/// without guard regions whose mprotect/madvise cause TLB shootdowns.
pub fn build(config: &KeelConfig) -> wasmtime::Result<Engine> {
    let comps = &config.components;
    let instances: u32 = comps
        .iter()
        .map(|c| c.limits.max_instances)
        .sum::<u32>()
        .max(1);
    let max_memory = comps
        .iter()
        .map(|c| c.limits.memory)
        .max()
        .unwrap_or(keel_config::DEFAULT_MEMORY);
    let max_core = comps
        .iter()
        .map(|c| c.limits.max_core_instances)
        .max()
        .unwrap_or(keel_config::DEFAULT_MAX_CORE_INSTANCES);
    let max_table = comps
        .iter()
        .map(|c| c.limits.max_table_elements)
        .max()
        .unwrap_or(keel_config::DEFAULT_MAX_TABLE_ELEMENTS);

    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        // wit-component output has a main module plus shim/fixup modules.
        .total_core_instances(instances.saturating_mul(4))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_core_instances_per_component(max_core)
        .max_memories_per_component(4)
        .max_tables_per_component(16)
        .table_elements(max_table as usize)
        .max_memory_size(max_memory as usize)
        .linear_memory_keep_resident(config.engine.keep_resident as usize)
        .table_keep_resident(64 * 1024)
        .pagemap_scan(Enabled::Auto);

    let mut cfg = Config::new();
    cfg.epoch_interruption(!limits_disabled())
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(20));
    // Keel drives WASIp2 components with `call_async` only; the per-store
    // component-model-async state is unused (+9 % req/s measured, see
    // BENCHMARKS.md). Turning it on again is needed for WASIp3 components.
    cfg.concurrency_support(false);
    if !config.engine.guard_pages {
        cfg.signals_based_traps(false)
            .memory_guard_size(0)
            .memory_reservation(max_memory)
            .memory_reservation_for_growth(0);
    }
    Engine::new(&cfg)
}

/// A compile-only engine producing artifacts `engine` can deserialize: the
/// same configuration (so the same compatibility hash), without the pool.
///
/// Cranelift keeps the contexts it compiled with (one per compiling thread,
/// each holding the buffers of the largest function it saw) for the life of
/// its engine: 10-13 MB after compiling the chat (heaptrack).
/// Compiling on an engine that is dropped once the components are loaded
/// gives that memory back; the serving engine never compiles.
pub fn compiler_for(engine: &Engine) -> wasmtime::Result<Engine> {
    let mut cfg = engine.config().clone();
    cfg.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    let compiler = Engine::new(&cfg)?;
    debug_assert_eq!(
        hash_of(&compiler.precompile_compatibility_hash()),
        hash_of(&engine.precompile_compatibility_hash())
    );
    Ok(compiler)
}

fn hash_of(h: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    h.hash(&mut hasher);
    hasher.finish()
}

/// Increments the engine epoch every [`EPOCH_TICK`] on a dedicated thread
/// (one per process, not per request). Stops when dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let flag = stop.clone();
        // Spawn failure at startup is unrecoverable; the process cannot
        // enforce deadlines without this thread.
        std::thread::Builder::new()
            .name("keel-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compile_engine_builds_artifacts_the_serving_engine_loads() {
        let config = KeelConfig::parse(std::path::Path::new("/nonexistent/keel.toml"), "").unwrap();
        let engine = build(&config).unwrap();
        let compiler = compiler_for(&engine).unwrap();
        assert_eq!(
            hash_of(&compiler.precompile_compatibility_hash()),
            hash_of(&engine.precompile_compatibility_hash())
        );
        // The smallest component: magic, version 0x0d, layer 1.
        let empty = [0, b'a', b's', b'm', 0x0d, 0, 0x01, 0];
        let compiled = compiler.precompile_component(&empty).unwrap();
        drop(compiler);
        // SAFETY: compiled just now by an engine with this configuration.
        unsafe { wasmtime::component::Component::deserialize(&engine, &compiled) }.unwrap();
    }
}
