//! `--profile`: where a training step's time goes (data, forward, backward,
//! update, or one CUDA graph replay), each part timed after synchronizing
//! the device so the time is the work's, not the launch's.

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
