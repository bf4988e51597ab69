//! What the benchmark examples share: their command-line lookup, peak RSS, and reading a
//! side's result from the last line of a child process's output. (A directory without
//! `main.rs`: cargo does not take it for an example of its own.)

use serde_json::Value;

/// The value after `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Peak resident set of this process, MiB (VmHWM, since the last reset).
pub fn peak_rss_mib() -> f64 {
    fedshield_edge::planner::peak_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64)
}

/// The JSON of the last line `out` printed; its stderr when it failed.
pub fn last_json_line(out: &std::process::Output, what: &str) -> Result<Value, String> {
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("{what} output {last:?}: {e}"))
}
