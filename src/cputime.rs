//! What this module owns: the CPU time a thread has used, read from Linux's
//! `/proc/.../schedstat`, whose first field is the thread's running time in nanoseconds. It
//! is the one reader behind `mdl bench --compile-only`'s CPU figure and the fuzz suite's
//! per-case budget: on a shared machine a thread's CPU time, unlike the wall time, does not
//! count the time it waited for a core. Where the file cannot be read (not Linux, an ended
//! thread) the answer is `None` and the callers fall back or say so.

use std::time::Duration;

/// The CPU time the calling thread has used.
pub fn this_thread() -> Option<Duration> {
    running_time_in(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// The CPU time thread `thread_id` of this process (from [`this_thread_id`]) has used;
/// `None` for id 0 or a thread that has ended.
pub fn of_thread(thread_id: u64) -> Option<Duration> {
    if thread_id == 0 {
        return None;
    }
    running_time_in(&std::fs::read_to_string(format!("/proc/self/task/{thread_id}/schedstat")).ok()?)
}

/// The Linux id of the calling thread, for [`of_thread`] on another thread (0 where it
/// cannot be read).
pub fn this_thread_id() -> u64 {
    let link = std::fs::read_link("/proc/thread-self").ok();
    link.and_then(|l| l.file_name()?.to_str()?.parse().ok()).unwrap_or(0)
}

/// The first of a schedstat line's three fields (running time in ns, waiting time in ns,
/// time slices run).
fn running_time_in(schedstat: &str) -> Option<Duration> {
    let ns: u64 = schedstat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_time_is_the_first_field_in_nanoseconds() {
        assert_eq!(running_time_in("1500000000 42 7\n"), Some(Duration::from_millis(1500)));
        assert_eq!(running_time_in(""), None);
        assert_eq!(running_time_in("x 1 2"), None);
    }

    #[test]
    fn a_busy_thread_counts_its_work_and_a_sleeping_one_does_not() {
        let start = this_thread().expect("Linux's /proc/thread-self/schedstat");
        std::thread::sleep(Duration::from_millis(200));
        let slept = this_thread().unwrap() - start;
        assert!(slept < Duration::from_millis(100), "sleeping used {slept:?} of CPU");
        let mut x = 0u64;
        while this_thread().unwrap() - start < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let id = this_thread_id();
        let other =
            std::thread::spawn(move || of_thread(id)).join().unwrap().expect("this thread's time, read from another");
        assert!(other >= Duration::from_millis(50), "read {other:?} from another thread");
        assert_eq!(of_thread(0), None);
    }
}
