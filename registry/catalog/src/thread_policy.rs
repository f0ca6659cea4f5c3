//! The scheduling policy of the data-plane threads (DNS UDP workers, proxy
//! threads): a setting both roles share, so it lives with the other shared types.
//!
//! `batch` (Linux `SCHED_BATCH`) keeps the thread's share of the CPU and its
//! nice value but stops it from preempting whatever runs when one of its
//! sockets wakes it. Under load the thread then wakes less often and finds
//! more work queued each time (bigger `recvmmsg` batches, more ready
//! connections per `epoll_wait`), which lowers the DNS workers' CPU per query
//! (W-dns in bench/RESULTS.md has the figures). An idle
//! core still runs the thread at once, so a lightly loaded agent answers as
//! fast as before.

use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ThreadPolicy {
    /// The kernel's default (`SCHED_OTHER`).
    #[default]
    Normal,
    /// `SCHED_BATCH`: no wake-up preemption.
    Batch,
}

impl ThreadPolicy {
    /// Applies the policy to the calling thread, keeping its nice value. A
    /// failure (a seccomp filter, a kernel without the policy) is logged and
    /// the thread goes on under the policy it had.
    pub fn apply_to_current_thread(self, thread: &str) {
        if let Err(e) = self.apply() {
            tracing::warn!(thread, policy = ?self, error = %e, "cannot set the thread's scheduling policy; it keeps the default");
        }
    }

    #[cfg(target_os = "linux")]
    fn apply(self) -> Result<(), String> {
        use thread_priority::unix::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
            ThreadSchedulePolicy,
        };
        use thread_priority::{ThreadPriority, ThreadPriorityValue};

        let policy = match self {
            ThreadPolicy::Normal => return Ok(()),
            ThreadPolicy::Batch => ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch),
        };
        // The crate also sets the nice value (per thread on Linux), from a
        // 0..=99 scale. Pick the step that maps to the thread's own nice value:
        // whatever the service manager set stays, and no privilege is needed
        // (lowering a nice value would need CAP_SYS_NICE).
        let nice = rustix::process::getpriority_process(None).map_err(|e| e.to_string())?;
        let priority = (0..=99u8)
            .filter_map(|step| ThreadPriorityValue::try_from(step).ok())
            .map(ThreadPriority::Crossplatform)
            .find(|p| p.to_posix(policy).ok() == Some(nice))
            .ok_or_else(|| format!("nice value {nice} has no step on the crate's scale"))?;
        set_thread_priority_and_policy(thread_native_id(), priority, policy)
            .map_err(|e| format!("{e:?}"))?;
        let after = rustix::process::getpriority_process(None).map_err(|e| e.to_string())?;
        if after != nice {
            return Err(format!("the nice value moved from {nice} to {after}"));
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn apply(self) -> Result<(), String> {
        match self {
            ThreadPolicy::Normal => Ok(()),
            ThreadPolicy::Batch => Err("SCHED_BATCH exists only on Linux".to_string()),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The policy of the calling thread as /proc reports it (field 41 of
    /// `stat`: 0 = SCHED_OTHER, 3 = SCHED_BATCH).
    fn current_policy() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        after_name
            .split(' ')
            .nth(38)
            .expect("policy field")
            .parse()
            .expect("number")
    }

    #[test]
    fn batch_is_applied_to_the_calling_thread_only_and_keeps_its_nice_value() {
        let main_policy = current_policy();
        let (policy, nice) = std::thread::spawn(|| {
            // A nice value other than the default, as a service manager may
            // set (raising it needs no privilege).
            rustix::process::setpriority_process(None, 5).expect("nice 5");
            let before = rustix::process::getpriority_process(None).expect("nice");
            ThreadPolicy::Batch.apply_to_current_thread("test");
            (
                current_policy(),
                (
                    before,
                    rustix::process::getpriority_process(None).expect("nice"),
                ),
            )
        })
        .join()
        .expect("thread");
        assert_eq!(policy, 3, "SCHED_BATCH");
        assert_eq!(nice, (5, 5), "nice value kept");
        assert_eq!(current_policy(), main_policy, "other threads untouched");
    }

    #[test]
    fn the_config_spells_it_in_lower_case() {
        #[derive(Deserialize)]
        struct T {
            p: ThreadPolicy,
        }
        let t: T = serde_json::from_str(r#"{"p":"batch"}"#).expect("batch");
        assert_eq!(t.p, ThreadPolicy::Batch);
        assert!(serde_json::from_str::<T>(r#"{"p":"fifo"}"#).is_err());
    }
}
