//! Process-wide settings for running the models on a CPU, applied once at start-up
//! ([`configure`]).
//!
//! - Memory: every layer allocates its output afresh, megabytes to tens of megabytes at a
//!   time. With its default settings glibc serves such blocks with fresh memory maps (its
//!   threshold adapts only up to the sizes it has seen freed) and returns freed heap to the
//!   system, so the next layer's output faults in and zero-fills its pages again: a sixth of
//!   the time of a batch-8 decompose. We make it keep and reuse that memory instead.
//! - Threads: the heavy work runs in `ops` on rayon's global pool. candle 0.11 runs its own
//!   elementwise operations (large additions, activations) on a second pool of spinning
//!   workers; on a small, shared CPU these spin against the rayon threads and wait on
//!   descheduled workers. Unless `CANDLE_NUM_THREADS` says otherwise, that pool gets no
//!   workers when serving, and candle's remaining elementwise work runs on the calling thread.
//!   Training keeps the pool: its backward passes sum gradients and multiply activations in
//!   candle's own elementwise operations, tensors of tens of megabytes, which on one thread
//!   left the other cores idle (VQ-VAE steps 12 % faster on 2 cores with the pool).
//! - Where the model runs: every parallel loop of `ops` started from a thread outside the
//!   rayon pool hands its work to the pool and puts the caller to sleep until it is done,
//!   hundreds of times a UNet evaluation. The model's entry points run on a pool thread
//!   instead ([`on_compute_pool`]), where those loops start in place: 3 % off a voc render.

/// Blocks up to this size come from the reusable heap (glibc's largest allowed threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Extra heap requested whenever the heap grows, so that growth happens rarely.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: i32 = 256 << 20;
/// candle's variable for the size of its elementwise pool (the calling thread included).
const CANDLE_THREADS_ENV: &str = "CANDLE_NUM_THREADS";

/// What the process runs, which decides the size of candle's elementwise pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Serving and running models: candle's pool gets no workers.
    Inference,
    /// Training: candle's pool keeps its default size, one worker per core.
    Training,
}

/// Applies the settings of this module for `workload`. Call it first thing in `main`, before
/// any other thread starts and before the model runs.
pub fn configure(workload: Workload) {
    keep_freed_memory();
    if workload == Workload::Inference && std::env::var_os(CANDLE_THREADS_ENV).is_none() {
        // Sound: called before any other thread exists, so nothing reads the environment
        // concurrently.
        std::env::set_var(CANDLE_THREADS_ENV, "1");
    }
}

/// Tells the C allocator (glibc on Linux) to keep freed memory for reuse rather than return it
/// to the system, and to serve blocks of up to 32 MiB from it; elsewhere it does nothing.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; these values are within its limits.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}

/// Runs `work` on a thread of rayon's global pool (in place when already on one) and returns
/// its result, the calling thread waiting meanwhile. The model's entry points (decompose, a
/// denoising step, a decode, a training step) go through it, so that the parallel loops of
/// their layers start from inside the pool rather than each waking it from outside.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
