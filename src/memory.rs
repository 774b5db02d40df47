//! Giving memory the node no longer uses back to the kernel: freed heap
//! (glibc malloc) and the code pages of its start.
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
//! So the node caps the arenas at two per core, serves every allocation of
//! [`MMAP_THRESHOLD`] or more with its own mapping, returned to the kernel
//! on free ([`configure_malloc`]; glibc raises that threshold up to 32 MiB
//! as large blocks are freed, after which bus and HTTP buffers fragment the
//! arenas; measured under the chat load: peak RSS per edge 54-56 MB instead
//! of 57-64), and releases the free pages of every arena with `malloc_trim(0)`
//! (`MADV_DONTNEED`) once it has loaded its components and then every
//! [`TRIM_INTERVAL`] on a thread of its own. A trim takes each arena's lock
//! in turn, typically for well under a millisecond; a page it released
//! costs a page fault when malloc reuses it.
//!
//! Code: starting touches a lot of the binary that serving never runs again
//! (configuration, RocksDB and SQLite opening, Cranelift compiling the
//! components on a cold artifact cache): ~19 MB of the text mapped at idle
//! with a warm cache, ~24 MB with a cold one, of which serving uses well
//! under half. Those pages are clean copies of the binary in the page cache,
//! but while they are mapped they count in the node's RSS and are the last
//! the kernel reclaims. [`release_startup_code`] unmaps them once after
//! loading (`MADV_DONTNEED` on the binary's read-only, never-written
//! mappings); what serving runs faults back in from the page cache, a minor
//! fault per page, no I/O.

use std::time::Duration;

/// How often [`start_periodic_trim`]'s thread trims.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Allocations of this size or more get a mapping of their own (glibc's
/// initial value, kept fixed).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Sets malloc up before the node starts its threads (see the module docs):
/// at most two arenas per core (glibc: eight per core; fewer arenas hold
/// less free memory between trims, and with one worker thread per core two
/// per core still leave every busy thread an arena of its own), and a fixed
/// [`MMAP_THRESHOLD`].
pub fn configure_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(cores.saturating_mul(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets malloc parameters. Setting the mmap
        // threshold also turns off its dynamic adjustment.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32);
        }
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

/// Unmaps the resident pages of this binary's read-only mappings that were
/// never written (see the module docs); returns how many bytes were
/// resident there. Mappings with a private (copy-on-write) page, such as
/// the relocated RELRO segment, are left alone: dropping those pages would
/// lose the relocations.
pub fn release_startup_code() -> std::io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let exe_inode = std::fs::metadata("/proc/self/exe")?.ino();
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut released = 0;
        for m in parse_smaps(&smaps) {
            if m.inode != exe_inode || m.writable || m.anonymous_kb != 0 || m.rss_kb == 0 {
                continue;
            }
            // SAFETY: a private, read-only file mapping without a written
            // page: dropping its pages loses nothing, the next access reads
            // the same bytes from the page cache.
            let rc = unsafe {
                libc::madvise(
                    m.start as *mut libc::c_void,
                    m.end - m.start,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            released += m.rss_kb * 1024;
        }
        Ok(released)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(0)
}

/// One mapping of `/proc/self/smaps`, as much as [`release_startup_code`]
/// needs.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    end: usize,
    writable: bool,
    inode: u64,
    rss_kb: u64,
    anonymous_kb: u64,
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            // `start-end perms offset dev inode [path]`
            let perms = fields.next().unwrap_or("");
            let inode = fields.nth(2).and_then(|i| i.parse().ok()).unwrap_or(0);
            out.push(Mapping {
                start,
                end,
                writable: perms.as_bytes().get(1) == Some(&b'w'),
                inode,
                rss_kb: 0,
                anonymous_kb: 0,
            });
            continue;
        }
        let Some(m) = out.last_mut() else { continue };
        let kb = || {
            fields
                .clone()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => m.rss_kb = kb(),
            "Anonymous:" => m.anonymous_kb = kb(),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_mappings_are_parsed_with_rss_and_anonymous_pages() {
        let text = "\
55d0c0000000-55d0c2000000 r-xp 00800000 08:01 4242 /usr/bin/keel
Size:              32768 kB
Rss:               19032 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
55d0c2000000-55d0c2100000 r--p 02800000 08:01 4242 /usr/bin/keel
Rss:                1028 kB
Anonymous:          1028 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                  12 kB
Anonymous:            12 kB
";
        let maps = parse_smaps(text);
        assert_eq!(
            maps,
            [
                Mapping {
                    start: 0x55d0c0000000,
                    end: 0x55d0c2000000,
                    writable: false,
                    inode: 4242,
                    rss_kb: 19032,
                    anonymous_kb: 0
                },
                Mapping {
                    start: 0x55d0c2000000,
                    end: 0x55d0c2100000,
                    writable: false,
                    inode: 4242,
                    rss_kb: 1028,
                    anonymous_kb: 1028
                },
                Mapping {
                    start: 0x7f0000000000,
                    end: 0x7f0000100000,
                    writable: true,
                    inode: 0,
                    rss_kb: 12,
                    anonymous_kb: 12
                },
            ]
        );
    }

    #[test]
    fn releasing_the_startup_code_keeps_the_process_running() {
        let released = release_startup_code().unwrap();
        if cfg!(target_os = "linux") {
            assert!(released > 0, "the test binary's text was resident");
        }
        // Code and read-only data fault back in: a formatted string needs both.
        assert_eq!(format!("{:?}", [1.5f64]), "[1.5]");
        release_startup_code().unwrap();
    }
}
