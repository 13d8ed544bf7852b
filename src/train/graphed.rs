//! The full-batch training step as a CUDA graph: forward, loss, backward,
//! the gradients' average over the ranks (NCCL's all-reduce, captured with
//! the rest; nothing in a plain run) and the fused update, replayed on
//! static input and output tensors. The
//! learning rate and step number are device tensors the optimizer fills
//! before each replay; the data pipeline stays eager (its randomness is
//! seeded per step, so a resumed run replays the same batches).

use anyhow::Result;
use tch::{Device, Tensor};

use super::config::TrainConfig;
use super::step::{Forward, forward_loss};
use crate::dist::World;
use crate::eval::EvalGraph;
use crate::model::Vgg;
use crate::numerics::Numerics;
use crate::optim::Optimizer;
use crate::shim::CudaGraph;

pub struct GraphedStep {
    graph: CudaGraph,
    /// Static tensors, set at the capture.
    io: Option<GraphIo>,
    /// What one replay adds to each BatchNorm's `num_batches_tracked`.
    bn_delta: Vec<i64>,
}

struct GraphIo {
    x: Tensor,
    y: Tensor,
    loss: Tensor,
    correct: Tensor,
}

/// What a captured step works on.
pub struct StepParts<'a> {
    pub model: &'a Vgg,
    pub numerics: &'a Numerics,
    pub opt: &'a mut Optimizer,
    pub label_smoothing: f64,
    pub world: &'a World,
}

impl GraphedStep {
    pub fn new(device: Device) -> Result<Self> {
        Ok(GraphedStep {
            graph: CudaGraph::new(device)?,
            io: None,
            bn_delta: Vec::new(),
        })
    }

    /// True for the first few steps (counting them), which the caller runs
    /// eagerly through [`GraphedStep::eager`].
    pub fn warming_up(&mut self) -> bool {
        self.graph.warming_up()
    }

    /// Whether the warm-up is over (without counting a step).
    pub fn warmed_up(&self) -> bool {
        self.graph.warmed_up()
    }

    /// Runs an eager warm-up step on the graph's stream.
    pub fn eager<T>(&mut self, step: impl FnOnce() -> Result<T>) -> Result<T> {
        self.graph.on_side_stream(|_| step())
    }

    /// One step after the warm-up: the first captures (which records without
    /// running), then every one replays, the captured one included. Returns
    /// copies of the loss and the correct count (the graph's own outputs are
    /// overwritten by the next replay).
    pub fn step(
        &mut self,
        parts: StepParts<'_>,
        x: &Tensor,
        y: &Tensor,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        let StepParts {
            model,
            numerics,
            opt,
            label_smoothing,
            world,
        } = parts;
        opt.prepare(lr);
        match &mut self.io {
            Some(io) => {
                io.x.copy_(x);
                io.y.copy_(y);
                model.add_batches_tracked(&self.bn_delta);
            }
            None => {
                let (sx, sy) = (x.copy(), y.copy());
                let before = counts(model);
                let (loss, correct) = self.graph.on_side_stream(|graph| {
                    let out = graph.capture(|| {
                        let Forward { loss, correct } =
                            forward_loss(model, numerics, &sx, &sy, label_smoothing);
                        let grads = opt.backward(&loss);
                        opt.reduce_gradients(&grads, |g| world.average(g))?;
                        opt.update(grads)?;
                        Ok((loss.detach(), correct))
                    });
                    out.and_then(|step| step)
                })?;
                self.bn_delta = counts(model)
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| a - b)
                    .collect();
                self.io = Some(GraphIo {
                    x: sx,
                    y: sy,
                    loss,
                    correct,
                });
            }
        }
        self.graph.replay()?;
        let io = self.io.as_ref().expect("set above");
        Ok((io.loss.copy(), io.correct.copy()))
    }
}

/// Each BatchNorm's `num_batches_tracked`, in order.
fn counts(model: &Vgg) -> Vec<i64> {
    model
        .num_batches_tracked()
        .into_iter()
        .map(|(_, n)| n)
        .collect()
}

/// The CUDA graphs a run replays, where its numerics graph: the training
/// step (not with accumulation, whose steps update every few batches, nor
/// with OneCycleLR's momentum, which changes every update), evaluation,
/// and the moving average's evaluation.
pub(super) type Graphs = (Option<GraphedStep>, Option<EvalGraph>, Option<EvalGraph>);

pub(super) fn graphs(numerics: &Numerics, config: &TrainConfig, device: Device) -> Result<Graphs> {
    let classes = config.model.classes;
    let eval_graph = |on: bool| -> Result<Option<EvalGraph>> {
        Ok(match on && numerics.cuda_graphs {
            true => Some(EvalGraph::new(device, &classes.into())?),
            false => None,
        })
    };
    Ok((
        match numerics.cuda_graphs && config.accum_steps <= 1 && !config.cycles_momentum() {
            true => Some(GraphedStep::new(device)?),
            false => None,
        },
        eval_graph(true)?,
        eval_graph(config.model_ema.is_some())?,
    ))
}
