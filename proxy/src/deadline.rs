//! Time limits on a proxy thread's waits without a tokio timer for each.
//!
//! Every read and write of an exchange runs under a limit (idle, header,
//! response, body, write), and on the io_uring path nearly every one of them
//! waits, so a tokio timer per wait (its registration, wheel insert and
//! removal, `Sleep` polls and clock reads) is a cost of every request; this
//! table costs less (the A/B is in bench/RESULTS.md). Here a wait that does
//! not finish on its
//! first poll takes a slot in the thread's table instead: the deadline and
//! the task's waker, no allocation once the table is warm. One sweeper task
//! per thread wakes every [`TICK`] while any slot is armed (and sleeps
//! otherwise), and wakes the tasks whose deadline has passed. A limit thus
//! ends between its deadline and one tick after it, never before.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// How often the sweeper looks at the armed deadlines: how late a limit may
/// end (the shortest limits are seconds long).
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// One thread's armed deadlines (not `Send`: each proxy thread has its own).
#[derive(Default)]
pub(crate) struct Deadlines {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    armed: Cell<usize>,
    /// The sweeper, while it waits for a first armed slot.
    sweeper: Cell<Option<Waker>>,
}

struct Slot {
    at: Instant,
    /// `None`: the slot is free.
    waker: Option<Waker>,
    expired: bool,
}

/// An armed slot; dropping it frees the slot.
struct Armed<'a> {
    deadlines: &'a Deadlines,
    index: usize,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let d = self.deadlines;
        if let Some(slot) = d.slots.borrow_mut().get_mut(self.index) {
            slot.waker = None;
            slot.expired = false;
        }
        d.free.borrow_mut().push(self.index);
        d.armed.set(d.armed.get() - 1);
    }
}

impl Deadlines {
    /// Runs `fut` until `deadline()`: `None` if it had not finished by then.
    /// The deadline is asked for (and the clock read) only if the first poll
    /// does not finish `fut`: most operations complete at once.
    pub(crate) async fn within_at<F: Future>(
        &self,
        deadline: impl FnOnce() -> Instant,
        fut: F,
    ) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut deadline = Some(deadline);
        let mut armed: Option<Armed<'_>> = None;
        poll_fn(|cx| {
            if let Poll::Ready(output) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            match &armed {
                None => {
                    let at = deadline.take().map_or_else(Instant::now, |f| f());
                    armed = Some(self.arm(at, cx.waker()));
                }
                Some(slot) => {
                    if self.refresh(slot.index, cx.waker()) {
                        return Poll::Ready(None);
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// `within_at` with a time limit from now.
    pub(crate) async fn within<F: Future>(&self, limit: Duration, fut: F) -> Option<F::Output> {
        self.within_at(|| Instant::now() + limit, fut).await
    }

    fn arm(&self, at: Instant, waker: &Waker) -> Armed<'_> {
        let mut slots = self.slots.borrow_mut();
        let slot = Slot {
            at,
            waker: Some(waker.clone()),
            expired: false,
        };
        let index = match self.free.borrow_mut().pop() {
            Some(index) => {
                slots[index] = slot;
                index
            }
            None => {
                slots.push(slot);
                slots.len() - 1
            }
        };
        self.armed.set(self.armed.get() + 1);
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.wake();
        }
        Armed {
            deadlines: self,
            index,
        }
    }

    /// True if the slot's deadline has passed; else keeps the waker current.
    fn refresh(&self, index: usize, waker: &Waker) -> bool {
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(index) else {
            return true;
        };
        if slot.expired {
            return true;
        }
        match &mut slot.waker {
            Some(current) if current.will_wake(waker) => {}
            current => *current = Some(waker.clone()),
        }
        false
    }

    /// Ends the waits whose deadline has passed, every [`TICK`] while any
    /// is armed. Spawn it once on the thread that uses these deadlines.
    pub(crate) async fn sweep(&self) {
        loop {
            poll_fn(|cx| {
                if self.armed.get() > 0 {
                    return Poll::Ready(());
                }
                self.sweeper.set(Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            tokio::time::sleep(TICK).await;
            self.expire(Instant::now());
        }
    }

    fn expire(&self, now: Instant) {
        for slot in self.slots.borrow_mut().iter_mut() {
            if slot.expired || slot.at > now {
                continue;
            }
            if let Some(waker) = &slot.waker {
                slot.expired = true;
                // Schedules the task; it runs after this sweep.
                waker.wake_by_ref();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn on_thread<F: Future<Output = ()>>(test: impl FnOnce(Rc<Deadlines>) -> F) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let deadlines = Rc::new(Deadlines::default());
            let sweeper = tokio::task::spawn_local({
                let deadlines = deadlines.clone();
                async move { deadlines.sweep().await }
            });
            tokio::time::timeout(Duration::from_secs(600), test(deadlines))
                .await
                .expect("a wait never ended");
            sweeper.abort();
        });
    }

    #[test]
    fn a_wait_ends_after_its_deadline_within_a_tick_and_never_before() {
        on_thread(|d| async move {
            let start = Instant::now();
            let limit = Duration::from_millis(300);
            let out = d.within(limit, std::future::pending::<()>()).await;
            assert!(out.is_none());
            let took = start.elapsed();
            assert!(took >= limit, "ended after {took:?}, before its {limit:?}");
            assert!(took <= limit + TICK * 2, "ended only after {took:?}");
            assert_eq!(d.armed.get(), 0, "the slot is freed");
        });
    }

    #[test]
    fn a_wait_that_finishes_in_time_returns_its_output_and_frees_its_slot() {
        on_thread(|d| async move {
            let out = d
                .within(Duration::from_secs(1), async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    7
                })
                .await;
            assert_eq!(out, Some(7));
            assert_eq!(d.armed.get(), 0);
            // Ready at the first poll: no slot at all.
            assert_eq!(d.within(Duration::from_secs(1), async { 8 }).await, Some(8));
            assert_eq!(d.slots.borrow().len(), 1, "only the first wait took a slot");
        });
    }

    #[test]
    fn many_waits_with_different_limits_each_end_at_their_own() {
        on_thread(|d| async move {
            let start = Instant::now();
            let waits: Vec<_> = (1..=20u64)
                .map(|i| {
                    let d = d.clone();
                    tokio::task::spawn_local(async move {
                        let limit = Duration::from_millis(100 * i);
                        // Odd ones finish halfway through their limit.
                        let out = d
                            .within(limit, async {
                                if i % 2 == 1 {
                                    tokio::time::sleep(limit / 2).await;
                                } else {
                                    std::future::pending::<()>().await;
                                }
                            })
                            .await;
                        (i, limit, out.is_some(), start.elapsed())
                    })
                })
                .collect();
            for wait in waits {
                let (i, limit, finished, at) = wait.await.expect("wait");
                assert_eq!(finished, i % 2 == 1, "wait {i}");
                if !finished {
                    assert!(
                        at >= limit && at <= limit + TICK * 2,
                        "wait {i} ended at {at:?}"
                    );
                }
            }
            assert_eq!(d.armed.get(), 0);
            assert!(d.slots.borrow().len() <= 20);
            // Freed slots are taken again.
            let _ = d
                .within(Duration::from_millis(10), std::future::pending::<()>())
                .await;
            assert!(d.slots.borrow().len() <= 20);
        });
    }

    #[test]
    fn a_dropped_wait_frees_its_slot_and_the_sweeper_goes_idle() {
        on_thread(|d| async move {
            let wait = d.within(Duration::from_secs(5), std::future::pending::<()>());
            let _ = tokio::time::timeout(Duration::from_millis(100), wait).await;
            assert_eq!(d.armed.get(), 0);
            // With nothing armed the sweeper parks (no wake-up every tick)
            // once its current tick is over.
            tokio::time::sleep(TICK * 2).await;
            assert!(d.sweeper.take().is_some(), "the sweeper is not parked");
        });
    }
}
