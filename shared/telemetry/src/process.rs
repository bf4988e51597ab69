//! What a process costs: CPU time of the calling thread and of the whole process (the
//! kernel's per-thread and per-process CPU clocks, nanosecond resolution) and the peak
//! resident set (`VmHWM` in `/proc/self/status`). The host's per-stage CPU figures and the
//! fleet simulator's (`fedshield-sim`) are read here.

use std::time::Duration;

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used here exist on every
    // Linux since 2.6.12. A failure leaves `ts` at zero.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time the calling thread has used (user and system).
pub fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time the whole process has used, every thread (user and system).
pub fn process_cpu() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The `VmHWM:` line of a `/proc/PID/status` text, bytes.
pub fn parse_peak_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// The peak resident set of this process so far, bytes (`None` without procfs).
pub fn peak_rss() -> Option<u64> {
    parse_peak_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// A thread's CPU time split over named stages: [`Stages::time`] runs a closure and
/// charges the CPU it used to a stage.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Stages(pub std::collections::BTreeMap<String, f64>);

impl Stages {
    /// Runs `f` on this thread, charging its CPU time to `stage`.
    pub fn time<T>(&mut self, stage: &str, f: impl FnOnce() -> T) -> T {
        let start = thread_cpu();
        let out = f();
        self.charge(stage, thread_cpu().saturating_sub(start));
        out
    }

    /// Adds `spent` to `stage`.
    pub fn charge(&mut self, stage: &str, spent: Duration) {
        match self.0.get_mut(stage) {
            Some(s) => *s += spent.as_secs_f64(),
            None => {
                self.0.insert(stage.to_string(), spent.as_secs_f64());
            }
        }
    }

    /// Seconds charged to `stage`.
    pub fn seconds(&self, stage: &str) -> f64 {
        self.0.get(stage).copied().unwrap_or(0.0)
    }

    /// Seconds over every stage.
    pub fn total(&self) -> f64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_peak_resident_set_from_a_status_file() {
        let status = "Name:\tx\nVmPeak:\t  20000 kB\nVmHWM:\t    1536 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_peak_rss(status), Some(1536 * 1024));
        assert_eq!(parse_peak_rss("Name:\tx\n"), None);
        assert_eq!(parse_peak_rss("VmHWM:\t12 MB\n"), None);
    }

    #[test]
    fn charges_busy_work_to_its_stage_and_not_a_sleep() {
        let mut stages = Stages::default();
        let sum = stages.time("busy", || {
            let start = thread_cpu();
            let mut x = 0u64;
            while thread_cpu() - start < Duration::from_millis(30) {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            x
        });
        assert!(sum > 0);
        stages.time("asleep", || std::thread::sleep(Duration::from_millis(50)));
        assert!(stages.seconds("busy") >= 0.03, "{stages:?}");
        // Sleeping costs (almost) no CPU: far below the 50 ms it took.
        assert!(stages.seconds("asleep") < 0.02, "{stages:?}");
        assert!(process_cpu() >= thread_cpu());
        assert!(peak_rss().unwrap() > 0);
        assert_eq!(stages.seconds("none"), 0.0);
        assert!((stages.total() - stages.seconds("busy") - stages.seconds("asleep")).abs() < 1e-12);
    }
}
