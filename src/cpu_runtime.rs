//! Process-wide settings for running the models on a CPU, applied once at start-up
//! ([`configure`]).
//!
//! - Memory: every layer allocates its output afresh, megabytes to hundreds of megabytes at a
//!   time (a training step's patch matrices). A general-purpose allocator serves such blocks
//!   with fresh memory maps or hands freed ones back to the system, so the next layer's output
//!   faults in and zero-fills its pages again: a sixth of the time of a batch-8 decompose,
//!   a quarter of a VQ-VAE training step's (a million page faults a step). The binary runs on
//!   mimalloc, told here never to return freed memory to the system but to reuse it: the
//!   process keeps its peak, which the request limits bound.
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

/// mimalloc's `mi_option_purge_delay` (its position in `mimalloc.h`'s `mi_option_e`, which
/// `libmimalloc-sys` does not name): how long freed memory waits before it is returned to the
/// system, in milliseconds; -1 never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
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

/// Tells mimalloc, the binary's allocator, to keep freed memory for reuse rather than return
/// it to the system; with any other allocator (the library's tests) it changes nothing.
fn keep_freed_memory() {
    // SAFETY: mi_option_set only changes an allocator parameter, read when memory is freed.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Runs `work` on a thread of rayon's global pool (in place when already on one) and returns
/// its result, the calling thread waiting meanwhile. The model's entry points (decompose, a
/// denoising step, a decode, a training step) go through it, so that the parallel loops of
/// their layers start from inside the pool rather than each waking it from outside.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        let purge_delay = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // The purge delay defaults to 1000 ms in the mimalloc built here (its neighbours: 1, 0).
        assert_eq!(purge_delay(), 1000);
        keep_freed_memory();
        assert_eq!(purge_delay(), -1);
    }
}
