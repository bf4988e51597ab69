//! What the box a device runs on can tell about itself, read from procfs and sysfs under a
//! configurable root (`/` on a device, a fixture tree in tests): memory (`/proc/meminfo`,
//! unified on Jetson: CPU and GPU share it), thermal zones with their trip points, the
//! INA3221 power rails, the integrated GPU's load and clock, CPU clocks, the power mode and
//! the over-current event counters. Layouts: Jetson Linux 32 (JetPack 4), 35 (JetPack 5)
//! and 36 (JetPack 6), and plain Linux (an x86 server has memory, some zones and CPU
//! clocks, nothing else).
//!
//! [`Telemetry::discover`] finds the sources once (sysfs numbering is not stable across
//! boots: zones are matched by `type`, rails by label, the GPU by its device-tree name);
//! [`Telemetry::read`] reads them. Nothing here fails: what the box lacks is listed in
//! [`Reading::lacks`], what could not be read this time in [`Reading::faults`], and an
//! offline sensor reads as `None`.

pub mod governor;
pub mod process;

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Degrees Celsius.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Celsius(pub f64);

/// Bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

/// Volts.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Volts(pub f64);

/// Amperes.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Amperes(pub f64);

/// Watts.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Watts(pub f64);

/// Hertz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Hertz(pub u64);

/// A thermal zone's temperature when the zone is offline (Jetson's CV zones while the
/// engines are powered down, for one), in millidegrees.
pub const OFFLINE_MILLIDEGREES: i64 = -256_000;

/// Device-tree names of Jetson integrated GPUs (Orin, Xavier, TX2, Nano).
pub const GPU_NAMES: [&str; 4] = ["ga10b", "gv11b", "gp10b", "gpu"];

/// Rails that measure the whole module's input: the total when present.
pub const INPUT_RAILS: [&str; 2] = ["VDD_IN", "POM_5V_IN"];

/// Memory, from `/proc/meminfo`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    /// `MemTotal`.
    pub total: Bytes,
    /// `MemAvailable`: what a new allocation can get (free plus reclaimable cache). The
    /// budget to plan against: on Tegra, CUDA's free-memory query reports `MemFree` and
    /// leaves the reclaimable cache out.
    pub available: Bytes,
    /// `MemFree`.
    pub free: Bytes,
    /// `NvMapMemUsed` (Jetson: memory the GPU driver has mapped), where the kernel has it.
    pub nvmap_used: Option<Bytes>,
    /// `SwapTotal`.
    pub swap_total: Bytes,
    /// `SwapFree`.
    pub swap_free: Bytes,
}

/// A trip point of a thermal zone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trip {
    /// `passive` (the kernel throttles), `active` (fans), `hot`, `critical` (shutdown).
    pub kind: String,
    /// Where it trips.
    pub temp: Celsius,
}

/// A thermal zone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Zone {
    /// Its `type` (`cpu-thermal`, `CPU-therm`, `x86_pkg_temp`, ...).
    pub name: String,
    /// The temperature; `None` while the zone is offline.
    pub temp: Option<Celsius>,
    /// Its trip points, as the kernel has them.
    pub trips: Vec<Trip>,
}

impl Zone {
    /// The lowest passive trip point: where the kernel starts throttling.
    pub fn passive(&self) -> Option<Celsius> {
        self.trips
            .iter()
            .filter(|t| t.kind == "passive")
            .map(|t| t.temp)
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    /// Degrees left before the passive trip point (negative above it).
    pub fn headroom(&self) -> Option<Celsius> {
        Some(Celsius(self.passive()?.0 - self.temp?.0))
    }
}

/// One power rail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rail {
    /// Its label (`VDD_IN`, `VDD_CPU_GPU_CV`, `POM_5V_GPU`, ...).
    pub name: String,
    /// Bus voltage.
    pub volts: Volts,
    /// Current.
    pub amps: Amperes,
    /// Power (the sensor's own figure where it has one, else volts x amps).
    pub watts: Watts,
}

/// The power rails.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Power {
    /// Every connected rail.
    pub rails: Vec<Rail>,
    /// The module's power: the input rail ([`INPUT_RAILS`]) where there is one, else the
    /// sum of the rails.
    pub total: Watts,
    /// Which: the input rail's name, or `sum`.
    pub total_from: String,
}

/// The integrated GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    /// Its device-tree name.
    pub name: String,
    /// Busy fraction, 0 to 1.
    pub load: Option<f64>,
    /// Current clock.
    pub freq: Option<Hertz>,
}

/// The CPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cpu {
    /// Online CPUs.
    pub online: Vec<u32>,
    /// Their current clocks (where cpufreq has them), in the order of `online`.
    pub freqs: Vec<Option<Hertz>>,
}

/// The power mode (`nvpmodel`): ids differ between modules, the name is what to report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PowerMode {
    /// The mode's id.
    pub id: u32,
    /// Its name in `/etc/nvpmodel.conf`.
    pub name: Option<String>,
    /// Whether it is the configured default (no mode was selected since the last reset).
    pub default: bool,
}

/// One reading of everything the box has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    /// The board's model (`/proc/device-tree/model`).
    pub model: Option<String>,
    /// Memory.
    pub memory: Option<Memory>,
    /// Thermal zones.
    pub zones: Vec<Zone>,
    /// Power rails.
    pub power: Option<Power>,
    /// The integrated GPU.
    pub gpu: Option<Gpu>,
    /// CPUs.
    pub cpu: Cpu,
    /// The power mode.
    pub power_mode: Option<PowerMode>,
    /// Over-current events counted by the SoC since boot (summed over its counters).
    pub over_current_events: Option<u64>,
    /// What the box does not have (from discovery).
    pub lacks: Vec<String>,
    /// What could not be read this time, and why.
    pub faults: Vec<String>,
}

impl Reading {
    /// The reading as lines for people (`fedshield-edge doctor`).
    pub fn summary(&self) -> Vec<String> {
        let gib = |b: Bytes| b.0 as f64 / f64::from(1u32 << 30);
        let mut lines = Vec::new();
        if let Some(model) = &self.model {
            lines.push(format!("board       : {model}"));
        }
        if let Some(m) = &self.memory {
            let nvmap = m
                .nvmap_used
                .map(|n| format!(", GPU-mapped {:.0} MiB", n.0 as f64 / f64::from(1u32 << 20)))
                .unwrap_or_default();
            lines.push(format!(
                "memory      : {:.1} GiB available of {:.1} GiB{nvmap}",
                gib(m.available),
                gib(m.total)
            ));
        }
        if !self.zones.is_empty() {
            let online: Vec<String> = self
                .zones
                .iter()
                .filter_map(|z| Some(format!("{} {:.1} C", z.name, z.temp?.0)))
                .collect();
            let offline = self.zones.iter().filter(|z| z.temp.is_none()).count();
            let hottest = self
                .hottest()
                .map(|(z, h)| format!("; {:.1} C below {}'s passive trip", h.0, z.name))
                .unwrap_or_default();
            lines.push(format!(
                "thermal     : {}{}{hottest}",
                online.join(", "),
                if offline > 0 {
                    format!(" ({offline} offline)")
                } else {
                    String::new()
                }
            ));
        }
        if let Some(p) = &self.power {
            let rails: Vec<String> = p
                .rails
                .iter()
                .map(|r| format!("{} {:.2} W", r.name, r.watts.0))
                .collect();
            lines.push(format!(
                "power       : {:.2} W ({}); {}",
                p.total.0,
                p.total_from,
                rails.join(", ")
            ));
        }
        if let Some(g) = &self.gpu {
            let load = g
                .load
                .map_or("load ?".into(), |l| format!("{:.1}% busy", l * 100.0));
            let freq = g
                .freq
                .map_or(String::new(), |f| format!(" at {} MHz", f.0 / 1_000_000));
            lines.push(format!("gpu         : {} {load}{freq}", g.name));
        }
        if !self.cpu.online.is_empty() {
            let mhz: Vec<u64> = self
                .cpu
                .freqs
                .iter()
                .flatten()
                .map(|f| f.0 / 1_000_000)
                .collect();
            let range = match (mhz.iter().min(), mhz.iter().max()) {
                (Some(lo), Some(hi)) if lo == hi => format!(" at {lo} MHz"),
                (Some(lo), Some(hi)) => format!(" at {lo}-{hi} MHz"),
                _ => String::new(),
            };
            lines.push(format!(
                "cpu         : {} online{range}",
                self.cpu.online.len()
            ));
        }
        if let Some(m) = &self.power_mode {
            lines.push(format!(
                "power mode  : {} (id {}{})",
                m.name.as_deref().unwrap_or("unnamed"),
                m.id,
                if m.default { ", the default" } else { "" }
            ));
        }
        if let Some(n) = self.over_current_events {
            lines.push(format!("over-current: {n} events since boot"));
        }
        for l in &self.lacks {
            lines.push(format!("lacks       : {l}"));
        }
        for f in &self.faults {
            lines.push(format!("unreadable  : {f}"));
        }
        lines
    }

    /// The zone closest to its passive trip point, with its headroom.
    pub fn hottest(&self) -> Option<(&Zone, Celsius)> {
        self.zones
            .iter()
            .filter_map(|z| Some((z, z.headroom()?)))
            .min_by(|a, b| a.1.0.total_cmp(&b.1.0))
    }
}

#[derive(Debug, Clone)]
struct ZoneSource {
    name: String,
    dir: PathBuf,
}

#[derive(Debug, Clone)]
enum RailSource {
    /// JetPack 5 and 6: hwmon `in{N}_label`, `in{N}_input` (mV), `curr{N}_input` (mA).
    Hwmon { name: String, dir: PathBuf, n: u32 },
    /// JetPack 4: iio `rail_name_{N}`, `in_voltage{N}_input` (mV), `in_current{N}_input`
    /// (mA), `in_power{N}_input` (mW).
    Iio { name: String, dir: PathBuf, n: u32 },
}

#[derive(Debug, Clone)]
struct GpuSource {
    name: String,
    devfreq: PathBuf,
}

/// The box's telemetry sources, found once.
#[derive(Debug, Clone)]
pub struct Telemetry {
    root: PathBuf,
    zones: Vec<ZoneSource>,
    rails: Vec<RailSource>,
    gpu: Option<GpuSource>,
    over_current: Vec<PathBuf>,
    lacks: Vec<String>,
}

/// A file's contents without surrounding whitespace and device-tree NULs.
fn read_text(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_string())
}

/// The entries of `dir`, sorted by name (none if it cannot be read).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Parses a CPU list such as `0-3,5,7-8`.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    Some(cpus)
}

/// Parses `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Result<Memory, String> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut words = rest.split_whitespace();
            let value: u64 = words.next()?.parse().ok()?;
            match words.next() {
                Some("kB") => value.checked_mul(1024),
                None => Some(value),
                Some(_) => None,
            }
        })
    };
    let need = |name: &str| field(name).ok_or_else(|| format!("meminfo has no {name}"));
    Ok(Memory {
        total: Bytes(need("MemTotal")?),
        available: Bytes(need("MemAvailable")?),
        free: Bytes(need("MemFree")?),
        nvmap_used: field("NvMapMemUsed").map(Bytes),
        swap_total: Bytes(field("SwapTotal").unwrap_or(0)),
        swap_free: Bytes(field("SwapFree").unwrap_or(0)),
    })
}

/// The power mode from `/var/lib/nvpmodel/status` (`pmode:0002`) and `/etc/nvpmodel.conf`
/// (`< POWER_MODEL ID=2 NAME=MAXN_SUPER >`, `< PM_CONFIG DEFAULT=2 >`): the selected mode,
/// else the configured default.
pub fn parse_power_mode(status: Option<&str>, conf: Option<&str>) -> Option<PowerMode> {
    let tag_value = |line: &str, key: &str| -> Option<String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(|v| v.trim_end_matches('>').to_string())
    };
    let selected = status.and_then(|s| {
        s.lines()
            .find_map(|l| l.trim().strip_prefix("pmode:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
    });
    let default = conf.and_then(|c| {
        c.lines()
            .filter(|l| l.contains("PM_CONFIG"))
            .find_map(|l| tag_value(l, "DEFAULT=")?.parse::<u32>().ok())
    });
    let (id, is_default) = match (selected, default) {
        (Some(id), d) => (id, d == Some(id)),
        (None, Some(id)) => (id, true),
        (None, None) => return None,
    };
    let name = conf.and_then(|c| {
        c.lines()
            .filter(|l| l.contains("POWER_MODEL"))
            .find(|l| tag_value(l, "ID=").and_then(|v| v.parse::<u32>().ok()) == Some(id))
            .and_then(|l| tag_value(l, "NAME="))
    });
    Some(PowerMode {
        id,
        name,
        default: is_default,
    })
}

impl Telemetry {
    /// Finds the sources under `root` (`/` on a device).
    pub fn discover(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let mut lacks = Vec::new();
        let zones = Self::find_zones(&root);
        if zones.is_empty() {
            lacks.push("thermal zones (sys/devices/virtual/thermal)".to_string());
        }
        let rails = Self::find_rails(&root);
        if rails.is_empty() {
            lacks.push("power rails (no INA3221 under sys/bus/i2c/drivers)".to_string());
        }
        let gpu = Self::find_gpu(&root);
        if gpu.is_none() {
            lacks.push(format!(
                "an integrated GPU (no devfreq device named one of {GPU_NAMES:?})"
            ));
        }
        let over_current = Self::find_over_current(&root);
        if over_current.is_empty() {
            lacks.push("over-current counters (no soctherm_oc hwmon)".to_string());
        }
        Self {
            root,
            zones,
            rails,
            gpu,
            over_current,
            lacks,
        }
    }

    /// What the box does not have.
    pub fn lacks(&self) -> &[String] {
        &self.lacks
    }

    fn find_zones(root: &Path) -> Vec<ZoneSource> {
        let mut zones: Vec<ZoneSource> = entries(&root.join("sys/devices/virtual/thermal"))
            .into_iter()
            .filter(|p| file_name(p).starts_with("thermal_zone"))
            .filter_map(|dir| {
                let name = read_text(&dir.join("type")).ok()?;
                Some(ZoneSource { name, dir })
            })
            .collect();
        // Zone numbers change between boots: keep the order stable by name.
        zones.sort_by(|a, b| a.name.cmp(&b.name).then(a.dir.cmp(&b.dir)));
        zones
    }

    fn find_rails(root: &Path) -> Vec<RailSource> {
        let mut rails = Vec::new();
        for chip in entries(&root.join("sys/bus/i2c/drivers/ina3221")) {
            for hwmon in entries(&chip.join("hwmon")) {
                for file in entries(&hwmon) {
                    let Some(n) = file_name(&file)
                        .strip_prefix("in")
                        .and_then(|r| r.strip_suffix("_label"))
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let Ok(name) = read_text(&file) else {
                        continue;
                    };
                    // Channel 7 is the sum of the shunt voltages, not a rail; NC is not
                    // connected.
                    if n == 7 || name == "NC" || name.to_lowercase().contains("sum of shunt") {
                        continue;
                    }
                    rails.push(RailSource::Hwmon {
                        name,
                        dir: hwmon.clone(),
                        n,
                    });
                }
            }
        }
        for chip in entries(&root.join("sys/bus/i2c/drivers/ina3221x")) {
            for dev in entries(&chip)
                .into_iter()
                .filter(|p| file_name(p).starts_with("iio:device"))
            {
                for file in entries(&dev) {
                    let Some(n) = file_name(&file)
                        .strip_prefix("rail_name_")
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let Ok(name) = read_text(&file) else {
                        continue;
                    };
                    if name == "NC" {
                        continue;
                    }
                    rails.push(RailSource::Iio {
                        name,
                        dir: dev.clone(),
                        n,
                    });
                }
            }
        }
        rails
    }

    fn find_gpu(root: &Path) -> Option<GpuSource> {
        entries(&root.join("sys/class/devfreq"))
            .into_iter()
            .find_map(|devfreq| {
                let name = read_text(&devfreq.join("device/of_node/name")).ok()?;
                GPU_NAMES
                    .contains(&name.as_str())
                    .then_some(GpuSource { name, devfreq })
            })
    }

    fn find_over_current(root: &Path) -> Vec<PathBuf> {
        entries(&root.join("sys/class/hwmon"))
            .into_iter()
            .filter(|h| read_text(&h.join("name")).is_ok_and(|n| n == "soctherm_oc"))
            .flat_map(|h| {
                entries(&h).into_iter().filter(|f| {
                    let n = file_name(f);
                    n.starts_with("oc") && n.ends_with("_event_cnt")
                })
            })
            .collect()
    }

    /// Reads everything now.
    pub fn read(&self) -> Reading {
        let mut faults = Vec::new();
        let memory = match std::fs::read_to_string(self.root.join("proc/meminfo")) {
            Ok(text) => parse_meminfo(&text)
                .map_err(|e| faults.push(format!("proc/meminfo: {e}")))
                .ok(),
            Err(e) => {
                faults.push(format!("proc/meminfo: {e}"));
                None
            }
        };
        let zones = self
            .zones
            .iter()
            .map(|z| self.read_zone(z, &mut faults))
            .collect();
        let power = self.read_power(&mut faults);
        let gpu = self.gpu.as_ref().map(|g| Gpu {
            name: g.name.clone(),
            load: self
                .number(&g.devfreq.join("device/load"), &mut faults)
                .map(|per_mille| per_mille as f64 / 1000.0),
            freq: self
                .number(&g.devfreq.join("cur_freq"), &mut faults)
                .map(|hz| Hertz(hz.max(0) as u64)),
        });
        let over_current_events = (!self.over_current.is_empty()).then(|| {
            self.over_current
                .iter()
                .filter_map(|p| self.number(p, &mut faults))
                .map(|n| n.max(0) as u64)
                .sum()
        });
        let optional = |rel: &str| read_text(&self.root.join(rel)).ok();
        Reading {
            model: optional("proc/device-tree/model"),
            memory,
            zones,
            power,
            gpu,
            cpu: self.read_cpu(&mut faults),
            power_mode: parse_power_mode(
                optional("var/lib/nvpmodel/status").as_deref(),
                optional("etc/nvpmodel.conf").as_deref(),
            ),
            over_current_events,
            lacks: self.lacks.clone(),
            faults,
        }
    }

    /// An integer file; a missing or garbled one is a fault of this reading.
    fn number(&self, path: &Path, faults: &mut Vec<String>) -> Option<i64> {
        let shown = path.strip_prefix(&self.root).unwrap_or(path).display();
        match read_text(path) {
            // Some drivers append a unit ("32760 ma").
            Ok(text) => match text.split_whitespace().next().map(str::parse::<i64>) {
                Some(Ok(v)) => Some(v),
                _ => {
                    faults.push(format!("{shown}: not a number: {text:?}"));
                    None
                }
            },
            Err(e) => {
                faults.push(format!("{shown}: {e}"));
                None
            }
        }
    }

    fn read_zone(&self, z: &ZoneSource, faults: &mut Vec<String>) -> Zone {
        let temp = match read_text(&z.dir.join("temp")) {
            // Offline: empty, the offline value, or EAGAIN while the sensor is powered down.
            Ok(t) if t.is_empty() => None,
            Ok(t) => match t.parse::<i64>() {
                Ok(OFFLINE_MILLIDEGREES) => None,
                Ok(m) => Some(Celsius(m as f64 / 1000.0)),
                Err(_) => {
                    faults.push(format!("zone {}: temperature {t:?}", z.name));
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => {
                faults.push(format!("zone {}: {e}", z.name));
                None
            }
        };
        let mut trips = Vec::new();
        for n in 0.. {
            let kind = z.dir.join(format!("trip_point_{n}_type"));
            let Ok(kind) = read_text(&kind) else { break };
            let at = read_text(&z.dir.join(format!("trip_point_{n}_temp")))
                .ok()
                .and_then(|t| t.parse::<i64>().ok());
            match at {
                Some(m) => trips.push(Trip {
                    kind,
                    temp: Celsius(m as f64 / 1000.0),
                }),
                None => faults.push(format!("zone {}: trip point {n} unreadable", z.name)),
            }
        }
        Zone {
            name: z.name.clone(),
            temp,
            trips,
        }
    }

    fn read_power(&self, faults: &mut Vec<String>) -> Option<Power> {
        if self.rails.is_empty() {
            return None;
        }
        let mut rails = Vec::new();
        for source in &self.rails {
            let (name, mv, ma, mw) = match source {
                RailSource::Hwmon { name, dir, n } => (
                    name,
                    self.number(&dir.join(format!("in{n}_input")), faults),
                    self.number(&dir.join(format!("curr{n}_input")), faults),
                    None,
                ),
                RailSource::Iio { name, dir, n } => {
                    let power = dir.join(format!("in_power{n}_input"));
                    (
                        name,
                        self.number(&dir.join(format!("in_voltage{n}_input")), faults),
                        self.number(&dir.join(format!("in_current{n}_input")), faults),
                        power
                            .exists()
                            .then(|| self.number(&power, faults))
                            .flatten(),
                    )
                }
            };
            let (Some(mv), Some(ma)) = (mv, ma) else {
                continue;
            };
            let watts = mw.map_or(mv as f64 * ma as f64 / 1e6, |mw| mw as f64 / 1e3);
            rails.push(Rail {
                name: name.clone(),
                volts: Volts(mv as f64 / 1e3),
                amps: Amperes(ma as f64 / 1e3),
                watts: Watts(watts),
            });
        }
        if rails.is_empty() {
            return None;
        }
        let (total, total_from) = match rails
            .iter()
            .find(|r| INPUT_RAILS.contains(&r.name.as_str()))
        {
            Some(input) => (input.watts, input.name.clone()),
            None => (
                Watts(rails.iter().map(|r| r.watts.0).sum()),
                "sum".to_string(),
            ),
        };
        Some(Power {
            rails,
            total,
            total_from,
        })
    }

    fn read_cpu(&self, faults: &mut Vec<String>) -> Cpu {
        let base = self.root.join("sys/devices/system/cpu");
        let online = match read_text(&base.join("online")) {
            Ok(text) => parse_cpu_list(&text).unwrap_or_else(|| {
                faults.push(format!("cpu/online: not a CPU list: {text:?}"));
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let freqs = online
            .iter()
            .map(|c| {
                let path = base.join(format!("cpu{c}/cpufreq/scaling_cur_freq"));
                // kHz; a box without cpufreq has no such file (not a fault).
                path.exists()
                    .then(|| self.number(&path, faults))
                    .flatten()
                    .map(|khz| Hertz(khz.max(0) as u64 * 1000))
            })
            .collect();
        Cpu { online, freqs }
    }
}

/// The fixture trees shipped with this crate (`fixtures/`: `orin-nano-jp6`,
/// `agx-orin-jp5`, `nano-jp4`, `x86-server`), for tests and demos (`fedshield-edge doctor
/// --root`).
pub mod fixtures {
    use std::path::{Path, PathBuf};

    /// The fixture tree `name`.
    pub fn path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name)
    }

    /// Copies the tree `from` into `to` (created), so that a test can rewrite its files.
    pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let target = to.join(e.file_name());
            if e.file_type()?.is_dir() {
                copy_tree(&e.path(), &target)?;
            } else {
                std::fs::copy(e.path(), target)?;
            }
        }
        Ok(())
    }
}
