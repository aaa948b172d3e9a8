//! Periodic CPU and memory readings of each traced process from procfs,
//! turned into samples (CPU % since the previous reading, RSS, peak RSS)
//! for the counter tracks. Bounded: the oldest samples go first.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{
    clock::WallClock,
    config::SamplingConfig,
    procinfo::{self, Reading},
    trace::ProcessSample,
};

pub struct Sampler {
    interval: Option<Duration>,
    max: usize,
    last_round: Option<Instant>,
    previous: HashMap<u32, (Instant, Reading)>,
    samples: VecDeque<ProcessSample>,
}

impl Sampler {
    pub fn new(cfg: &SamplingConfig) -> Self {
        Self {
            interval: (cfg.interval_ms > 0).then(|| Duration::from_millis(cfg.interval_ms)),
            max: cfg.max_samples.max(1),
            last_round: None,
            previous: HashMap::new(),
            samples: VecDeque::new(),
        }
    }

    /// Reads every running traced process if an interval has passed.
    pub fn maybe_sample(&mut self, pids: Vec<u32>) {
        let Some(interval) = self.interval else { return };
        let now = Instant::now();
        if self.last_round.is_some_and(|t| now.duration_since(t) < interval) {
            return;
        }
        self.last_round = Some(now);
        let ts_ns = WallClock::monotonic_now_ns();
        for pid in pids {
            let Some(reading) = procinfo::read(pid) else { continue };
            if let Some((then, prev)) = self.previous.get(&pid) {
                let elapsed = now.duration_since(*then).as_secs_f64();
                if self.samples.len() >= self.max {
                    self.samples.pop_front();
                }
                self.samples.push_back(procinfo::sample(pid, ts_ns, prev, &reading, elapsed));
            }
            self.previous.insert(pid, (now, reading));
        }
    }

    pub fn forget(&mut self, pid: u32) {
        self.previous.remove(&pid);
    }

    /// Samples kept, of one process or all.
    pub fn samples(&self, pid: Option<u32>) -> Vec<ProcessSample> {
        self.samples.iter().filter(|s| pid.is_none_or(|p| s.pid == p)).copied().collect()
    }
}
