//! What an accept loop does when accept(2) fails. Out of descriptors
//! (EMFILE, ENFILE) or memory, another try fails again at once while the
//! listener stays readable, so the loop would spin a core and log at the
//! speed of the failures: it pauses between tries instead and logs one line
//! per `LOG_EVERY` with the count. Errors of one connection (aborted before
//! it was taken) need no pause. Every role's accept loops share this rule.

use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether this process's accept loops take connections. An upgrading
/// agent holds them until it has told its predecessor it is ready: until
/// then the predecessor accepts from the very same sockets, so a successor
/// that dies or hangs before `ready` leaves no accepted connection behind.
fn gate() -> &'static tokio::sync::watch::Sender<bool> {
    static GATE: OnceLock<tokio::sync::watch::Sender<bool>> = OnceLock::new();
    GATE.get_or_init(|| tokio::sync::watch::channel(true).0)
}

/// Accept loops wait (at `accepts_open`) until `open_accepts`.
pub fn hold_accepts() {
    gate().send_replace(false);
}

pub fn open_accepts() {
    gate().send_replace(true);
}

/// Resolves once this process's accept loops may take connections (at
/// once, but in an upgrading agent not ready yet).
pub async fn accepts_open() {
    let mut open = gate().subscribe();
    let _ = open.wait_for(|open| *open).await;
}

/// Pause after an accept failed for want of descriptors or memory.
pub const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);
/// At most one log line per listener this often while accepts fail.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's failed accepts.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    since_log: u64,
    logged_at: Option<Instant>,
}

/// What to do after one failed accept.
#[derive(Debug, PartialEq, Eq)]
pub struct AcceptBackoff {
    /// How long to wait before accepting again (zero: at once).
    pub pause: Duration,
    /// `Some(failures since the last line)` when a line is due now.
    pub log: Option<u64>,
}

impl AcceptErrors {
    /// Counts a failed accept at `now`.
    pub fn failed(&mut self, error: &io::Error, now: Instant) -> AcceptBackoff {
        self.since_log += 1;
        use rustix::io::Errno;
        let exhausted = Errno::from_io_error(error).is_some_and(|e| {
            [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].contains(&e)
        });
        let due = self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
        let log = due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.since_log)
        });
        AcceptBackoff {
            pause: if exhausted {
                EXHAUSTED_PAUSE
            } else {
                Duration::ZERO
            },
            log,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_accepts_wait_until_opened() {
        use std::future::Future;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        hold_accepts();
        let mut waiting = std::pin::pin!(accepts_open());
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        open_accepts();
        runtime.block_on(waiting);
        runtime.block_on(accepts_open());
    }

    #[test]
    fn out_of_descriptors_pauses_and_logs_once_per_interval_with_a_count() {
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from(rustix::io::Errno::MFILE);
        let start = Instant::now();
        let first = errors.failed(&emfile, start);
        assert_eq!(first.pause, EXHAUSTED_PAUSE);
        assert_eq!(first.log, Some(1));
        for i in 1..100u64 {
            let later = start + Duration::from_millis(i * 50);
            let b = errors.failed(&emfile, later);
            assert_eq!(b.pause, EXHAUSTED_PAUSE);
            if i * 50 < 10_000 {
                assert_eq!(b.log, None, "at {i}");
            }
        }
        let after = errors.failed(&emfile, start + LOG_EVERY + Duration::from_secs(1));
        assert_eq!(after.log, Some(100), "every failure since the first line");
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(&aborted, start).pause, Duration::ZERO);
    }
}
