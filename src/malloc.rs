//! Giving freed heap memory back to the kernel (glibc malloc).
//!
//! glibc keeps what a program frees for reuse: in the arena it was freed
//! in (up to 8 per core; a thread uses the arena it was given), and it
//! returns only the free tail of a heap. Memory freed in the middle of a
//! heap, or in an arena whose threads have gone quiet, stays resident. A
//! node frees in bursts: compiling components at start (wasmtime's
//! compile threads), and queues that fill and drain under load (bus
//! messages, HTTP buffers). Measured under the chat load (BENCHMARKS.md):
//! after the start, ~25 MB of the heap was free but resident; after the
//! load, 25-40 MB.
//!
//! So the node caps the arenas at two per core ([`limit_arenas`]) and
//! releases the free pages of every arena with `malloc_trim(0)`
//! (`MADV_DONTNEED`) once it has loaded its components and then every
//! [`TRIM_INTERVAL`] on a thread of its own. A trim takes each arena's lock
//! in turn, typically for well under a millisecond; a page it released
//! costs a page fault when malloc reuses it.

use std::time::Duration;

/// How often [`start_periodic_trim`]'s thread trims.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Caps malloc's arenas at two per core (glibc: eight per core), before the
/// node starts its threads. Fewer arenas hold less free memory between
/// trims; on a node serving with one worker thread per core, two per core
/// still leaves every busy thread an arena of its own.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(cores.saturating_mul(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a malloc parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

/// Returns the free memory malloc holds, in every arena, to the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_INTERVAL`] for the life of the process.
pub fn start_periodic_trim() -> std::io::Result<()> {
    if cfg!(not(all(target_os = "linux", target_env = "gnu"))) {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("keel-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_INTERVAL);
                trim();
            }
        })?;
    Ok(())
}
