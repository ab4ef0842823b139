//! Giving the heap a worker freed back to the operating system.
//!
//! glibc's `malloc` keeps what a process frees inside its arenas for reuse,
//! and returns it to the system only from the top of each heap. Free space
//! below a live allocation stays resident, so a worker that once held a
//! burst of calls keeps that burst's RSS for the rest of its life, whatever
//! it holds afterwards. The million-job soak showed it: one of three workers
//! went from 99.7 MiB at 10% of the night to 157.5 MiB at 90% while the
//! calls in flight fell from 923 to 444 (docs/benchmarks.md, "The
//! million-job night").
//!
//! [`trim_periodically`] asks glibc every [`TRIM_EVERY`] to hand back the
//! free pages of every arena (`malloc_trim(0)`: `madvise(MADV_DONTNEED)` on
//! whole free pages, also in the middle of a heap). It runs on the blocking
//! pool, takes a few milliseconds, and ends when the worker stops. With any
//! other C library it does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the worker hands freed heap back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Every [`TRIM_EVERY`] until `token` is cancelled: [`trim`].
pub async fn trim_periodically(token: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {
                // Awaited: at most one trim at a time, none after shutdown.
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

/// Return the free pages of every malloc arena to the operating system;
/// whether any memory was released (always false without glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() -> bool {
    extern "C" {
        /// glibc, `<malloc.h>`: `int malloc_trim(size_t pad)`.
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: malloc_trim takes no pointers, only a size; it locks each
    // arena itself and is safe to call from any thread at any time.
    unsafe { malloc_trim(0) == 1 }
}

/// Return the free pages of every malloc arena to the operating system;
/// whether any memory was released (always false without glibc).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// This process's resident set, in KiB (`VmRSS`).
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn freed_heap_below_a_live_allocation_goes_back_to_the_system() {
        // 64 MiB in 4 KiB blocks, each written so its page is resident,
        // then one block kept above them: glibc's free cannot shrink the
        // heap from the top past it, so the 64 MiB stay resident after
        // they are freed until trim hands them back.
        let mut blocks: Vec<Box<[u8]>> = (0..16_384)
            .map(|i| vec![(i % 251) as u8; 4096].into_boxed_slice())
            .collect();
        let keep = vec![1u8; 4096].into_boxed_slice();
        let full = rss_kib();
        blocks.clear();
        blocks.shrink_to_fit();
        let freed = rss_kib();
        assert!(super::trim(), "trim released memory");
        let trimmed = rss_kib();
        assert!(
            freed.saturating_sub(trimmed) > 32 * 1024,
            "RSS {full} KiB full, {freed} KiB after free, {trimmed} KiB after trim"
        );
        assert_eq!(keep[4095], 1);
    }
}
