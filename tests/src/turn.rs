//! Turns for the tests of one binary that holds several test files (one
//! module each): tests of the same file may run at the same time, as they
//! were written to, but never next to another file's tests. Each starts a
//! few daemons and containerd instances on two cores, and some bound what
//! they measure (a fast 404, a stall detected); a neighbour from another
//! file would share their cores.

use std::sync::{Condvar, Mutex};

struct State {
    /// The module whose tests run now, and how many of them.
    module: Option<&'static str>,
    running: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    module: None,
    running: 0,
});
static CHANGED: Condvar = Condvar::new();

/// A running test's turn; dropping it (also when the test panics) lets the
/// other modules' tests run once none of its module's is left.
#[must_use = "the turn lasts as long as this value"]
pub struct Turn(());

/// Waits until no test of another module runs; `module` is the caller's
/// `module_path!()`.
pub fn take(module: &'static str) -> Turn {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    while state.module.is_some_and(|m| m != module) {
        state = CHANGED.wait(state).unwrap_or_else(|e| e.into_inner());
    }
    state.module = Some(module);
    state.running += 1;
    Turn(())
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.running -= 1;
        if state.running == 0 {
            state.module = None;
            CHANGED.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn a_module_never_runs_beside_another() {
        static RUNNING: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let threads: Vec<_> = [0, 1, 0, 1, 0, 1]
            .into_iter()
            .map(|m: usize| {
                std::thread::spawn(move || {
                    let _turn = take(["a", "b"][m]);
                    RUNNING[m].fetch_add(1, Ordering::SeqCst);
                    let other = RUNNING[1 - m].load(Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    RUNNING[m].fetch_sub(1, Ordering::SeqCst);
                    other
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), 0, "two modules ran at once");
        }
        assert_eq!(STATE.lock().expect("lock").running, 0);
    }
}
