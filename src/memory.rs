//! The binaries' allocator: jemalloc, configured for a worker's memory.
//!
//! Both binaries (`switchyard`, `switchyard-bench`, whose in-process runs
//! are a worker) declare [`crate::jemalloc_global!`]; the library itself
//! leaves the choice to whoever links it (its tests run on the system
//! allocator).
//!
//! Why not glibc's `malloc`: a profile of a full-load run (`perf record -a
//! -g`, `switchyard-bench --json`) put `malloc`, `free` and their
//! consolidation at a third of the worker's CPU; jemalloc's per-thread
//! caches serve the same allocations for a fraction of that
//! (docs/benchmarks.md, "jemalloc"). glibc also keeps a burst's freed heap
//! resident below any live allocation, which an earlier build worked around
//! with `malloc_trim(0)` every 10 s.
//!
//! [`MALLOC_CONF`] sets:
//! - `narenas:1`: one arena. jemalloc's default (four per core) holds a
//!   partly used arena per thread; at 1,000 calls in flight that put a
//!   worker at 66 MiB, over the 64 MB target, against 61–62 MiB with one.
//!   The threads' caches (below) keep them off the arena's lock.
//! - `tcache_max:4096`: per-thread caches for sizes up to 4 KiB, where
//!   nearly all of a job's allocations are (messages, rows, JSON).
//! - `background_thread:true`: a jemalloc thread returns freed pages to the
//!   system after `dirty_decay_ms` (10 s), also while the worker is idle,
//!   as the trim did.
//!
//! An operator may override any of them without a rebuild through the
//! environment variable `_RJEM_MALLOC_CONF` (jemalloc's `MALLOC_CONF`,
//! under the prefix of this build's symbols), e.g.
//! `_RJEM_MALLOC_CONF=narenas:2`; `stats_print:true` prints the allocator's
//! options and statistics when the process exits.

/// jemalloc's options for the binaries: see the module doc.
pub const MALLOC_CONF: &std::ffi::CStr = c"narenas:1,tcache_max:4096,background_thread:true";

/// A C string pointer jemalloc reads at start-up (`const char
/// *malloc_conf`): what [`crate::jemalloc_global!`] exports.
#[repr(transparent)]
pub struct Conf(pub *const std::ffi::c_char);

// SAFETY: it points at a `'static` string that is never written.
unsafe impl Sync for Conf {}

#[cfg(not(target_env = "msvc"))]
pub use tikv_jemallocator::Jemalloc;

/// Make jemalloc, with [`MALLOC_CONF`], the global allocator of the binary
/// that invokes it (once, at its crate root).
#[macro_export]
macro_rules! jemalloc_global {
    () => {
        #[cfg(not(target_env = "msvc"))]
        #[global_allocator]
        static GLOBAL_ALLOCATOR: $crate::memory::Jemalloc = $crate::memory::Jemalloc;

        /// jemalloc reads its options from this symbol before `main`.
        #[cfg(not(target_env = "msvc"))]
        #[export_name = "_rjem_malloc_conf"]
        pub static JEMALLOC_CONF: $crate::memory::Conf =
            $crate::memory::Conf($crate::memory::MALLOC_CONF.as_ptr());
    };
}
