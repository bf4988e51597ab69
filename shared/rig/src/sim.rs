//! The rig's side of the protocol as a pure state machine, the same code for the rig
//! simulator (`fedshield-rig-sim` in hil-tests drives it over a pty) and for rig firmware:
//! it answers the edge's requests, streams telemetry at the rate asked for, models the
//! device's supply current and temperature from the load the device reports, and plays a
//! scenario of faults (cut the network, warn of and cut the power, heat the device, add
//! line noise) at times, rounds, phases or training steps. Time is passed in (ms); what the
//! driver must do is returned ([`Output`]).

use crate::frame::Message;
use crate::messages::*;
use alloc::string::String;
use alloc::vec::Vec;

/// The device's temperature as a first-order system: it moves towards `ambient + load x
/// rise` with time constant `tau_s` (forward Euler, exact enough for steps up to `tau_s`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thermal {
    /// Ambient temperature, C.
    pub ambient_c: f64,
    /// Rise above ambient at full load, C.
    pub rise_c: f64,
    /// Time constant, s.
    pub tau_s: f64,
}

/// The rig's fixed properties.
#[derive(Debug, Clone, PartialEq)]
pub struct RigConfig {
    /// Firmware name and version.
    pub firmware: String,
    /// The device's supply voltage, mV.
    pub supply_mv: u32,
    /// The device's current when idle, mA.
    pub idle_ma: u32,
    /// Its current at full load, mA.
    pub busy_ma: u32,
    /// The device's thermal behaviour.
    pub thermal: Thermal,
    /// Shortest telemetry interval the rig streams at, ms.
    pub min_interval_ms: u32,
}

/// When a scenario step fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// At this many ms after the rig started.
    At(u64),
    /// When the device reports this round.
    Round(u64),
    /// When the device reports this round and phase.
    Phase(u64, EdgePhase),
    /// When the device reports this round and at least this many steps trained.
    Step(u64, u32),
}

/// A fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Open the network relay for `for_ms`.
    CutNetwork {
        /// How long.
        for_ms: u64,
    },
    /// Warn of a power cut `warn_ms` ahead, open the power relay then, close it `off_ms`
    /// later.
    CutPower {
        /// Warning time.
        warn_ms: u32,
        /// Time without power.
        off_ms: u64,
    },
    /// Add `celsius` to the device's temperature for `for_ms` (a blocked fan, a hot room).
    Heat {
        /// Degrees added.
        celsius: f64,
        /// How long.
        for_ms: u64,
    },
    /// Corrupt bytes the rig sends at `per_million` for `for_ms`.
    Noise {
        /// Byte error rate, per million.
        per_million: u32,
        /// How long.
        for_ms: u64,
    },
}

/// One scenario step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// When.
    pub when: Trigger,
    /// What.
    pub fault: Fault,
}

/// What the driver does with the rig's decisions.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this message to the edge.
    Send(Message),
    /// The power relay: `false` cuts the device's power (the simulator kills the device
    /// process), `true` restores it (it starts the device again).
    Power(bool),
    /// The network relay (the simulator's proxy between device and broker).
    Network(bool),
    /// Corrupt the bytes sent to the edge at this rate from now on (0: clean line).
    Noise(u32),
    /// A scenario step fired (index into the scenario), for the rig's log.
    Fired(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pending {
    PowerOff { at: u64, off_ms: u64 },
    PowerOn { at: u64 },
    NetworkOn { at: u64 },
    HeatOff { at: u64, celsius: f64 },
    NoiseOff { at: u64 },
}

impl Pending {
    fn at(&self) -> u64 {
        match *self {
            Self::PowerOff { at, .. }
            | Self::PowerOn { at }
            | Self::NetworkOn { at }
            | Self::HeatOff { at, .. }
            | Self::NoiseOff { at } => at,
        }
    }
}

/// The rig.
#[derive(Debug, Clone)]
pub struct Rig {
    config: RigConfig,
    scenario: Vec<Step>,
    fired: Vec<bool>,
    pending: Vec<Pending>,
    relays: Relays,
    interval_ms: u32,
    next_reading: u64,
    temp_c: f64,
    extra_c: f64,
    last_ms: u64,
    status: Option<EdgeStatus>,
    seq: u32,
}

/// The load a device puts on its supply and heat sink (0 to 1): what it idles at, plus
/// its trainer's duty cycle while it trains.
pub fn load_of(status: &EdgeStatus) -> f64 {
    const IDLE: f64 = 0.1;
    match status.phase {
        EdgePhase::Training => IDLE + (1.0 - IDLE) * f64::from(status.duty_pct.min(100)) / 100.0,
        EdgePhase::Uploading => 0.4,
        EdgePhase::Idle | EdgePhase::Joined | EdgePhase::Waiting => IDLE,
    }
}

impl Rig {
    /// A rig with both relays closed, the device at ambient temperature, playing
    /// `scenario`.
    pub fn new(config: RigConfig, scenario: Vec<Step>) -> Self {
        Self {
            temp_c: config.thermal.ambient_c,
            fired: alloc::vec![false; scenario.len()],
            config,
            scenario,
            pending: Vec::new(),
            relays: Relays {
                power: true,
                network: true,
            },
            interval_ms: 0,
            next_reading: 0,
            extra_c: 0.0,
            last_ms: 0,
            status: None,
            seq: 0,
        }
    }

    /// The rig's identity.
    pub fn identity(&self) -> Identity {
        Identity {
            firmware: self.config.firmware.clone(),
            protocol: PROTOCOL_VERSION,
            digest: protocol_digest(),
            capabilities: Capabilities {
                supply_meter: true,
                board_temperature: true,
                fan: false,
                relays: alloc::vec![Relay::Power, Relay::Network],
            },
        }
    }

    /// The device's modelled temperature, C.
    pub fn temperature(&self) -> f64 {
        self.temp_c + self.extra_c
    }

    /// The relays' states.
    pub fn relays(&self) -> Relays {
        self.relays
    }

    /// The last status the device reported.
    pub fn device_status(&self) -> Option<EdgeStatus> {
        self.status
    }

    fn load(&self) -> f64 {
        if !self.relays.power {
            return 0.0;
        }
        self.status.as_ref().map_or(0.1, load_of)
    }

    /// A reading now.
    pub fn sensors(&self, now_ms: u64) -> Sensors {
        let powered = self.relays.power;
        let ma = f64::from(self.config.idle_ma)
            + self.load() * f64::from(self.config.busy_ma.saturating_sub(self.config.idle_ma));
        Sensors {
            uptime_ms: now_ms,
            supply_mv: Some(if powered { self.config.supply_mv } else { 0 }),
            supply_ma: Some(if powered { ma as u32 } else { 0 }),
            board_mc: Some((self.temperature() * 1000.0) as i32),
            fan_rpm: None,
            relays: self.relays,
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn unasked<T: serde::Serialize>(&mut self, key: crate::Key, value: &T) -> Output {
        let seq = self.next_seq();
        Output::Send(message(key, seq, value))
    }

    /// Advances the thermal model to `now_ms`.
    fn advance(&mut self, now_ms: u64) {
        let dt = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        let t = self.config.thermal;
        let target = t.ambient_c + self.load() * t.rise_c;
        let k = if t.tau_s > 0.0 {
            (dt / t.tau_s).min(1.0)
        } else {
            1.0
        };
        self.temp_c += (target - self.temp_c) * k;
    }

    /// A message from the edge at `now_ms`: the answer to a request (with its sequence
    /// number), and whatever the device's new status triggers. A message the rig cannot
    /// decode is answered with nothing (the edge times out and reports it).
    pub fn on_message(&mut self, m: &Message, now_ms: u64) -> Vec<Output> {
        self.advance(now_ms);
        let Ok(msg) = FromEdge::decode(m) else {
            return Vec::new();
        };
        let reply = |key, body: &dyn erased::Encode| {
            Output::Send(Message {
                key,
                seq: m.seq,
                body: body.encode(),
            })
        };
        let mut out = Vec::new();
        match msg {
            FromEdge::Ping(p) => out.push(reply(PingEndpoint::RESPONSE_KEY, &p)),
            FromEdge::Identify => out.push(reply(IdentifyEndpoint::RESPONSE_KEY, &self.identity())),
            FromEdge::SetRelay(s) => {
                match s.relay {
                    Relay::Power => self.relays.power = s.closed,
                    Relay::Network => self.relays.network = s.closed,
                }
                out.push(match s.relay {
                    Relay::Power => Output::Power(s.closed),
                    Relay::Network => Output::Network(s.closed),
                });
                out.push(reply(SetRelayEndpoint::RESPONSE_KEY, &self.relays));
            }
            FromEdge::ReadSensors => out.push(reply(
                ReadSensorsEndpoint::RESPONSE_KEY,
                &self.sensors(now_ms),
            )),
            FromEdge::StartTelemetry(t) => {
                self.interval_ms = match t.interval_ms {
                    0 => 0,
                    i => i.max(self.config.min_interval_ms),
                };
                self.next_reading = now_ms + u64::from(self.interval_ms);
                out.push(reply(
                    TelemetryEndpoint::RESPONSE_KEY,
                    &TelemetryRate {
                        interval_ms: self.interval_ms,
                    },
                ));
            }
            FromEdge::Status(s) => {
                self.status = Some(s);
                out.extend(self.fire(now_ms, |w| match w {
                    Trigger::At(_) => false,
                    Trigger::Round(r) => s.round >= r,
                    Trigger::Phase(r, p) => s.round == r && s.phase == p,
                    Trigger::Step(r, k) => s.round == r && s.step >= k,
                }));
            }
        }
        out
    }

    /// The clock at `now_ms`: streamed readings that are due, scenario steps whose time has
    /// come, and the ends of faults in progress.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output> {
        self.advance(now_ms);
        let mut out = self.fire(now_ms, |w| matches!(w, Trigger::At(t) if now_ms >= t));
        self.pending.sort_by_key(Pending::at);
        while let Some(p) = self.pending.first().copied().filter(|p| p.at() <= now_ms) {
            self.pending.remove(0);
            match p {
                Pending::PowerOff { at, off_ms } => {
                    self.relays.power = false;
                    self.interval_ms = 0; // the restarted device asks again
                    out.push(Output::Power(false));
                    self.pending.push(Pending::PowerOn { at: at + off_ms });
                    self.pending.sort_by_key(Pending::at);
                }
                Pending::PowerOn { .. } => {
                    self.relays.power = true;
                    self.status = None; // the device starts over
                    out.push(Output::Power(true));
                    let changed = RelayChanged {
                        relay: Relay::Power,
                        closed: true,
                    };
                    out.push(self.unasked(RelayTopic::KEY, &changed));
                }
                Pending::NetworkOn { .. } => {
                    self.relays.network = true;
                    out.push(Output::Network(true));
                    let changed = RelayChanged {
                        relay: Relay::Network,
                        closed: true,
                    };
                    out.push(self.unasked(RelayTopic::KEY, &changed));
                }
                Pending::HeatOff { celsius, .. } => self.extra_c -= celsius,
                Pending::NoiseOff { .. } => out.push(Output::Noise(0)),
            }
        }
        if self.interval_ms > 0 && now_ms >= self.next_reading {
            self.next_reading = now_ms + u64::from(self.interval_ms);
            let reading = self.sensors(now_ms);
            out.push(self.unasked(TelemetryTopic::KEY, &reading));
        }
        out
    }

    /// Fires the scenario steps not fired yet whose trigger `due` accepts, in order.
    fn fire(&mut self, now_ms: u64, due: impl Fn(Trigger) -> bool) -> Vec<Output> {
        let mut out = Vec::new();
        for i in 0..self.scenario.len() {
            if self.fired[i] || !due(self.scenario[i].when) {
                continue;
            }
            self.fired[i] = true;
            out.push(Output::Fired(i));
            match self.scenario[i].fault {
                Fault::CutNetwork { for_ms } => {
                    self.relays.network = false;
                    out.push(Output::Network(false));
                    let changed = RelayChanged {
                        relay: Relay::Network,
                        closed: false,
                    };
                    out.push(self.unasked(RelayTopic::KEY, &changed));
                    self.pending.push(Pending::NetworkOn {
                        at: now_ms + for_ms,
                    });
                }
                Fault::CutPower { warn_ms, off_ms } => {
                    out.push(self.unasked(BrownOutTopic::KEY, &BrownOut { in_ms: warn_ms }));
                    self.pending.push(Pending::PowerOff {
                        at: now_ms + u64::from(warn_ms),
                        off_ms,
                    });
                }
                Fault::Heat { celsius, for_ms } => {
                    self.extra_c += celsius;
                    self.pending.push(Pending::HeatOff {
                        at: now_ms + for_ms,
                        celsius,
                    });
                }
                Fault::Noise {
                    per_million,
                    for_ms,
                } => {
                    out.push(Output::Noise(per_million));
                    self.pending.push(Pending::NoiseOff {
                        at: now_ms + for_ms,
                    });
                }
            }
        }
        out
    }

    /// Whether every scenario step has fired and every fault has ended.
    pub fn scenario_done(&self) -> bool {
        self.fired.iter().all(|f| *f) && self.pending.is_empty()
    }
}

/// Encoding behind a trait object (the replies above are of several types).
mod erased {
    use alloc::vec::Vec;

    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            postcard::to_allocvec(self).expect("rig messages encode")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Message;
    use alloc::vec;

    fn rig(scenario: Vec<Step>) -> Rig {
        Rig::new(
            RigConfig {
                firmware: "rig-sim 0.1".into(),
                supply_mv: 19_000,
                idle_ma: 300,
                busy_ma: 1_300,
                thermal: Thermal {
                    ambient_c: 30.0,
                    rise_c: 50.0,
                    tau_s: 60.0,
                },
                min_interval_ms: 100,
            },
            scenario,
        )
    }

    fn ask<T: serde::Serialize>(key: crate::Key, seq: u32, body: &T) -> Message {
        message(key, seq, body)
    }

    fn sent(out: &[Output]) -> Vec<FromRig> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(m) => Some(FromRig::decode(m).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn status(round: u64, phase: EdgePhase, step: u32) -> Message {
        let s = EdgeStatus {
            round,
            phase,
            step,
            persisted_round: round.saturating_sub(1),
            duty_pct: if phase == EdgePhase::Training { 100 } else { 0 },
        };
        ask(StatusTopic::KEY, 1, &s)
    }

    #[test]
    fn requests_are_answered_with_their_sequence_numbers() {
        let mut r = rig(vec![]);
        let out = r.on_message(&ask(PingEndpoint::REQUEST_KEY, 41, &Ping { nonce: 9 }), 0);
        let Output::Send(m) = &out[0] else { panic!() };
        assert_eq!((m.key, m.seq), (PingEndpoint::RESPONSE_KEY, 41));
        assert_eq!(sent(&out), vec![FromRig::Pong(Ping { nonce: 9 })]);
        let out = r.on_message(&ask(IdentifyEndpoint::REQUEST_KEY, 42, &Identify), 0);
        assert_eq!(sent(&out), vec![FromRig::Identity(r.identity())]);
        let cut = SetRelay {
            relay: Relay::Network,
            closed: false,
        };
        let out = r.on_message(&ask(SetRelayEndpoint::REQUEST_KEY, 43, &cut), 0);
        assert_eq!(out[0], Output::Network(false));
        assert_eq!(
            sent(&out),
            vec![FromRig::Relays(Relays {
                power: true,
                network: false
            })]
        );
        // Asked for 10 ms, the rig streams at its 100 ms floor.
        let rate = StartTelemetry { interval_ms: 10 };
        let out = r.on_message(&ask(TelemetryEndpoint::REQUEST_KEY, 44, &rate), 0);
        assert_eq!(
            sent(&out),
            vec![FromRig::TelemetryRate(TelemetryRate { interval_ms: 100 })]
        );
        assert!(r.tick(50).is_empty());
        assert!(matches!(sent(&r.tick(100))[..], [FromRig::Telemetry(_)]));
        assert!(r.tick(150).is_empty());
        assert_eq!(sent(&r.tick(200)).len(), 1);
        // A message the rig does not know gets no answer.
        assert!(
            r.on_message(&ask(TelemetryTopic::KEY, 45, &r.sensors(0)), 0)
                .is_empty()
        );
    }

    #[test]
    fn current_and_temperature_follow_the_load_the_device_reports() {
        let mut r = rig(vec![]);
        assert_eq!(r.sensors(0).supply_ma, Some(400)); // idle: 300 + 0.1 x 1000
        r.on_message(&status(1, EdgePhase::Training, 0), 0);
        assert_eq!(r.sensors(0).supply_ma, Some(1_300));
        // Training for 5 minutes in 1 s steps: the temperature rises towards 80 C.
        let mut last = r.temperature();
        for t in 1..=300u64 {
            r.tick(t * 1000);
            assert!(r.temperature() >= last);
            last = r.temperature();
        }
        assert!(last > 79.0 && last <= 80.0, "{last}");
        assert_eq!(r.sensors(300_000).board_mc, Some((last * 1000.0) as i32));
        // Idle again: it cools towards 35 C.
        r.on_message(&status(1, EdgePhase::Waiting, 10), 300_000);
        r.tick(600_000);
        assert!(r.temperature() < 40.0, "{}", r.temperature());
    }

    #[test]
    fn a_power_cut_is_warned_of_then_cut_then_restored_at_a_training_step() {
        let scenario = vec![Step {
            when: Trigger::Step(2, 3),
            fault: Fault::CutPower {
                warn_ms: 500,
                off_ms: 2_000,
            },
        }];
        let mut r = rig(scenario);
        assert!(
            r.on_message(&status(1, EdgePhase::Training, 5), 0)
                .is_empty()
        );
        assert!(
            r.on_message(&status(2, EdgePhase::Training, 2), 10)
                .is_empty()
        );
        let out = r.on_message(&status(2, EdgePhase::Training, 3), 1_000);
        assert_eq!(out[0], Output::Fired(0));
        assert_eq!(sent(&out), vec![FromRig::BrownOut(BrownOut { in_ms: 500 })]);
        assert!(r.tick(1_499).is_empty());
        assert_eq!(r.tick(1_500), vec![Output::Power(false)]);
        assert_eq!(r.sensors(1_600).supply_ma, Some(0));
        assert!(r.tick(3_499).is_empty());
        let out = r.tick(3_500);
        assert_eq!(out[0], Output::Power(true));
        assert_eq!(
            sent(&out),
            vec![FromRig::RelayChanged(RelayChanged {
                relay: Relay::Power,
                closed: true
            })]
        );
        assert!(r.scenario_done());
        // Fired once: the same status again does nothing.
        assert!(
            r.on_message(&status(2, EdgePhase::Training, 4), 4_000)
                .is_empty()
        );
    }

    #[test]
    fn network_cuts_heat_and_noise_start_and_end_on_time() {
        let scenario = vec![
            Step {
                when: Trigger::At(1_000),
                fault: Fault::CutNetwork { for_ms: 5_000 },
            },
            Step {
                when: Trigger::Phase(1, EdgePhase::Uploading),
                fault: Fault::Noise {
                    per_million: 10_000,
                    for_ms: 2_000,
                },
            },
            Step {
                when: Trigger::Round(2),
                fault: Fault::Heat {
                    celsius: 30.0,
                    for_ms: 10_000,
                },
            },
        ];
        let mut r = rig(scenario);
        assert!(r.tick(999).is_empty());
        let out = r.tick(1_000);
        assert_eq!(out[..2], [Output::Fired(0), Output::Network(false)]);
        assert!(!r.relays().network);
        let out = r.on_message(&status(1, EdgePhase::Uploading, 8), 2_000);
        assert_eq!(out, vec![Output::Fired(1), Output::Noise(10_000)]);
        assert_eq!(r.tick(4_000), vec![Output::Noise(0)]);
        let out = r.tick(6_000);
        assert_eq!(out[0], Output::Network(true));
        let before = r.temperature();
        r.on_message(&status(2, EdgePhase::Idle, 0), 6_000);
        assert!(r.temperature() - before > 29.9);
        r.tick(16_000);
        assert!(r.temperature() < before + 1.0, "{}", r.temperature());
        assert!(r.scenario_done());
    }
}
