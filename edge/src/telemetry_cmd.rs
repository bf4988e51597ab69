//! `fedshield-edge telemetry`: the box's readings (`fedshield_telemetry`) as JSON lines.

use fedshield_telemetry::{Reading, Telemetry};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args)]
pub struct TelemetryArgs {
    /// Root under which proc/ and sys/ are read (a fixture tree for tests and demos).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Seconds between readings.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Readings to take (0: until stopped).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// One line: the time (seconds since the Unix epoch) and the reading.
#[derive(serde::Serialize)]
struct Line<'a> {
    t: f64,
    #[serde(flatten)]
    reading: &'a Reading,
}

pub fn telemetry(args: TelemetryArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.interval.is_finite() && args.interval > 0.0,
        "--interval must be a positive number of seconds"
    );
    let source = Telemetry::discover(&args.root);
    let mut out = std::io::stdout().lock();
    let mut taken = 0u64;
    loop {
        let reading = source.read();
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let line = serde_json::to_string(&Line {
            t,
            reading: &reading,
        })?;
        let written = writeln!(out, "{line}").and_then(|()| out.flush());
        match written {
            // The reader went away (`| head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
        taken += 1;
        if args.count > 0 && taken >= args.count {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs_f64(args.interval));
    }
}

/// The box's readings under `root`, for `doctor`.
pub fn summary(root: &std::path::Path) -> Vec<String> {
    Telemetry::discover(root).read().summary()
}
