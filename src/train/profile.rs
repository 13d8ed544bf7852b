//! `--profile`: where a training step's time goes (data, forward, backward,
//! update, or one CUDA graph replay), each part timed after synchronizing
//! the device so the time is the work's, not the launch's; and, for a few
//! warm steps, libtorch's profiler's operators and kernels (`ops.csv`).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::device::synchronize;

/// Seconds spent in each part of the training steps of an epoch (`--profile`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StepProfile {
    pub steps: u64,
    /// Gathering the batch and augmentation.
    pub data: f64,
    /// Forward pass (in the run's layout and precision) and loss.
    pub forward: f64,
    /// Backward pass.
    #[serde(default)]
    pub backward: f64,
    /// Optimizer update.
    #[serde(default)]
    pub update: f64,
    /// Steps run as one CUDA graph replay (forward, backward and update
    /// together), and their time.
    #[serde(default)]
    pub graphed_steps: u64,
    #[serde(default)]
    pub graphed: f64,
}

/// Times the parts of a step when profiling (a no-op otherwise).
pub struct StepTimer {
    on: bool,
    device: Device,
    at: Instant,
}

impl StepTimer {
    pub fn start(on: bool, device: Device) -> Self {
        let t = StepTimer {
            on,
            device,
            at: Instant::now(),
        };
        t.sync();
        StepTimer {
            at: Instant::now(),
            ..t
        }
    }

    fn sync(&self) {
        if self.on {
            synchronize(self.device);
        }
    }

    /// Adds the time since the last lap to `into`.
    pub fn lap(self, into: &mut f64) -> Self {
        if !self.on {
            return self;
        }
        self.sync();
        *into += self.at.elapsed().as_secs_f64();
        StepTimer {
            at: Instant::now(),
            ..self
        }
    }
}

/// Steps run once the step is warm (after a CUDA graph's capture and its
/// first replay) before `--profile` records operators.
const WARM_STEPS: u32 = 2;
/// Steps whose operators and kernels `--profile` records.
pub const RECORDED_STEPS: u32 = 10;

/// `--profile`'s operator table: libtorch's profiler over
/// [`RECORDED_STEPS`] steps once the step is warm (or fewer, where the
/// epoch ends first), written as `ops.csv`: per host operator and GPU
/// kernel, its calls and self time per step.
pub struct OpsRecorder {
    state: Ops,
    device: Device,
}

enum Ops {
    Off,
    /// Warm steps seen so far.
    Waiting(u32),
    /// Steps recorded so far.
    Recording(u32),
    Done,
}

impl OpsRecorder {
    pub fn new(on: bool, device: Device) -> Self {
        let state = if on { Ops::Waiting(0) } else { Ops::Off };
        OpsRecorder { state, device }
    }

    /// Before a step; `warm` when it runs as every later step will (the
    /// CUDA graph, if any, captured).
    pub fn before_step(&mut self, warm: bool) -> anyhow::Result<()> {
        if let Ops::Waiting(seen) = &mut self.state
            && warm
        {
            *seen += 1;
            if *seen > WARM_STEPS {
                synchronize(self.device);
                crate::shim::profiler::start(self.device.is_cuda())?;
                self.state = Ops::Recording(0);
            }
        }
        Ok(())
    }

    /// After a step: the table is written to `out` after the last one.
    pub fn after_step(&mut self, out: &std::path::Path) -> anyhow::Result<Option<u32>> {
        if let Ops::Recording(n) = &mut self.state {
            *n += 1;
            if *n == RECORDED_STEPS {
                return self.finish(out);
            }
        }
        Ok(None)
    }

    /// Stops recording (at the end of an epoch, say) and writes the table
    /// of the steps recorded to `out`; returns how many, if any.
    pub fn finish(&mut self, out: &std::path::Path) -> anyhow::Result<Option<u32>> {
        let Ops::Recording(steps) = self.state else {
            return Ok(None);
        };
        synchronize(self.device);
        let events = crate::shim::profiler::stop()?;
        self.state = Ops::Done;
        if steps == 0 {
            return Ok(None);
        }
        crate::fsutil::write_atomic_bytes(out, ops_csv(&events, steps).as_bytes())?;
        Ok(Some(steps))
    }
}

/// One operator's or kernel's line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct OpRow {
    pub gpu: bool,
    pub name: String,
    pub calls: u64,
    /// Its own time: its duration less that of the operators it called.
    pub self_ns: u64,
}

/// The events summed per (device, name), with self times: on each host
/// thread an operator's time less its callees' (events nested in it);
/// kernels on a stream do not nest. Largest self time first.
pub fn op_table(events: &[crate::shim::profiler::Event]) -> Vec<OpRow> {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&i| {
        let e = &events[i];
        (e.gpu, e.lane, e.start_ns, std::cmp::Reverse(e.duration_ns))
    });
    let mut own: Vec<u64> = events.iter().map(|e| e.duration_ns).collect();
    let mut open: Vec<usize> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let e = &events[i];
        if k > 0 && (events[order[k - 1]].gpu, events[order[k - 1]].lane) != (e.gpu, e.lane) {
            open.clear();
        }
        let end = |j: usize| events[j].start_ns + events[j].duration_ns;
        while open.last().is_some_and(|&j| end(j) <= e.start_ns) {
            open.pop();
        }
        if let Some(&parent) = open.last()
            && end(i) <= end(parent)
        {
            own[parent] = own[parent].saturating_sub(e.duration_ns);
        }
        open.push(i);
    }
    let mut rows: std::collections::BTreeMap<(bool, &str), OpRow> = Default::default();
    for (e, own) in events.iter().zip(own) {
        let row = rows.entry((e.gpu, &e.name)).or_insert_with(|| OpRow {
            gpu: e.gpu,
            name: e.name.clone(),
            calls: 0,
            self_ns: 0,
        });
        row.calls += 1;
        row.self_ns += own;
    }
    let mut rows: Vec<OpRow> = rows.into_values().collect();
    rows.sort_by_key(|r| (r.gpu, std::cmp::Reverse(r.self_ns)));
    rows
}

/// [`op_table`] as CSV, per step of `steps`: device, calls, milliseconds
/// of self time, share of the device's total, name (quoted: kernel names
/// hold commas). GPU kernels first.
pub fn ops_csv(events: &[crate::shim::profiler::Event], steps: u32) -> String {
    let rows = op_table(events);
    let total = |gpu: bool| -> u64 {
        rows.iter()
            .filter(|r| r.gpu == gpu)
            .map(|r| r.self_ns)
            .sum()
    };
    let (gpu_total, cpu_total) = (total(true).max(1), total(false).max(1));
    let mut out = String::from("device,calls_per_step,ms_per_step,share,name\n");
    for r in rows
        .iter()
        .filter(|r| r.gpu)
        .chain(rows.iter().filter(|r| !r.gpu))
    {
        let whole = if r.gpu { gpu_total } else { cpu_total };
        out += &format!(
            "{},{},{:.4},{:.4},\"{}\"\n",
            if r.gpu { "cuda" } else { "cpu" },
            r.calls as f64 / steps as f64,
            r.self_ns as f64 / 1e6 / steps as f64,
            r.self_ns as f64 / whole as f64,
            r.name.replace('"', "\"\"")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::profiler::Event;

    fn ev(name: &str, gpu: bool, lane: u64, start_ns: u64, end: u64) -> Event {
        Event {
            name: name.into(),
            gpu,
            lane,
            start_ns,
            duration_ns: end - start_ns,
        }
    }

    /// Self times take out only the directly nested events, per thread;
    /// kernels on a stream add up; the CSV is per step.
    #[test]
    fn self_times_subtract_callees_per_thread() {
        let events = [
            ev("a", false, 1, 0, 100),
            ev("b", false, 1, 10, 40),
            ev("c", false, 1, 20, 30),
            ev("d", false, 1, 50, 90),
            ev("a", false, 2, 5, 55),
            ev("k,<2>", true, 7, 0, 10),
            ev("k,<2>", true, 7, 20, 30),
        ];
        let rows = op_table(&events);
        let got: Vec<(bool, &str, u64, u64)> = rows
            .iter()
            .map(|r| (r.gpu, r.name.as_str(), r.calls, r.self_ns))
            .collect();
        assert_eq!(
            got,
            [
                (false, "a", 2, 30 + 50),
                (false, "d", 1, 40),
                (false, "b", 1, 20),
                (false, "c", 1, 10),
                (true, "k,<2>", 2, 20),
            ]
        );
        let csv = ops_csv(&events, 2);
        assert!(csv.contains("\ncuda,1,0.0000,1.0000,\"k,<2>\"\n"), "{csv}");
        assert!(csv.contains("\ncpu,1,0.0000,0.5333,\"a\"\n"), "{csv}");
    }
}
