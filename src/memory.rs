//! Allocator settings for a process that runs the models: every layer allocates its output
//! afresh, megabytes to tens of megabytes at a time.
//!
//! With its default settings glibc serves such blocks with fresh memory maps (its threshold
//! adapts only up to the sizes it has seen freed) and returns freed heap to the system, so the
//! next layer's output faults in and zero-fills its pages again: a sixth of the time of a batch-8
//! decompose. [`keep_freed_memory`] makes it keep and reuse that memory instead.

/// Blocks up to this size come from the reusable heap (glibc's largest allowed threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Extra heap requested whenever the heap grows, so that growth happens rarely.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: i32 = 256 << 20;

/// Tells the C allocator (glibc on Linux) to keep freed memory for reuse rather than return it
/// to the system, and to serve blocks of up to 32 MiB from it. Call once at start-up, before
/// the model runs; elsewhere (other C libraries, other systems) it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; these values are within its limits.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}
