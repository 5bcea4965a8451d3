//! Keeping the model pool's other workers awake while a forward pass runs.
//!
//! A forward pass of a small model is hundreds of short parallel ops with serial work
//! between them. An idle rayon worker spins about 30 `sched_yield`s and then sleeps on a
//! futex; the next op must wake it, and in a VM a sleeping vCPU is halted, so each op
//! paid a wake-up: the tiny fixture's UNet step made ~300 futex sleeps and wakes and
//! spent 17 % of its CPU time in the kernel, and took 58–65 ms (51–53 ms with this).
//! PyTorch's OpenMP threads spin between parallel regions instead. Here, for the length
//! of a pass, every other worker runs a task that takes the pool's pending tasks as
//! they appear and spins (with `pause`) in between.
//!
//! A spinning task must not hold up work below it on its thread's stack (a task that
//! waits in a join can pick it up): it never runs on a thread inside a pass or inside
//! another spinning task, only one pass at a time has them, and each gives up after
//! [`MAX_IDLE`] without work, so that the worst case is a pause, never a deadlock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `pause`s between two looks for work: short next to a task (microseconds), long
/// enough not to hammer the queues' cache lines.
const SPINS: usize = 32;

/// Looks for work between two `sched_yield`s (and clock reads): other threads of the
/// process (the HTTP server's) still get the core within tens of microseconds.
const LOOKS_PER_YIELD: usize = 64;

/// Longest wait for work before a spinning task returns its thread to rayon's idling:
/// longer than the gaps between a pass's parallel ops, short next to a pass.
const MAX_IDLE: Duration = Duration::from_millis(2);

/// Whether some pass has spinning tasks now.
static CLAIMED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread runs a pass ([`with_workers_awake`]'s `f`) or a spinning task.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (on a worker of the current pool) with the pool's other workers spinning for
/// its tasks instead of sleeping; they go back to rayon's own idling when `f` returns.
pub(super) fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    let me = rayon::current_thread_index();
    if threads < 2
        || me.is_none()
        || BUSY.get()
        || CLAIMED
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return f();
    }
    let stop = AtomicBool::new(false);
    let stop = &stop;
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(move |_| {
                // Not on the thread running `f` (which pops it once `f` is done), nor
                // above another spinning task or pass on this thread's stack.
                if rayon::current_thread_index() != me && !BUSY.get() {
                    BUSY.set(true);
                    spin_for_tasks(stop);
                    BUSY.set(false);
                }
            });
        }
        // Stops the spinning tasks however `f` ends: the scope waits for them, also
        // when `f` panics.
        let _pass = Pass::enter(stop);
        f()
    })
}

/// Runs the pool's pending tasks as they appear until `stop`, or [`MAX_IDLE`] without
/// any.
fn spin_for_tasks(stop: &AtomicBool) {
    let mut idle_since = Instant::now();
    let mut looks = 0usize;
    while !stop.load(Ordering::Acquire) {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            looks = 0;
            continue;
        }
        if looks == 0 {
            idle_since = Instant::now();
        }
        for _ in 0..SPINS {
            std::hint::spin_loop();
        }
        looks += 1;
        if looks.is_multiple_of(LOOKS_PER_YIELD) {
            if idle_since.elapsed() > MAX_IDLE {
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// While alive: this thread runs a pass; dropped, its spinning tasks stop.
struct Pass<'a>(&'a AtomicBool);

impl<'a> Pass<'a> {
    fn enter(stop: &'a AtomicBool) -> Self {
        BUSY.set(true);
        Pass(stop)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        BUSY.set(false);
        self.0.store(true, Ordering::Release);
        CLAIMED.store(false, Ordering::Release);
    }
}
