//! The parts of the fused training step (issue #18) and the sets of them a
//! run asks for and uses; `--no-fused-step=PART,...` leaves parts out.

use serde::{Deserialize, Serialize};

use crate::choice::Choice;

/// A part of the fused training step (issue #18). Each is on by default
/// where it applies; `--no-fused-step=PART,...` leaves parts out, to
/// measure what each brings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepPart {
    /// Convolutions before BatchNorm without their zero bias.
    NoBias,
    /// Without BatchNorm: convolution, bias and ReLU in one cuDNN kernel.
    ConvRelu,
    /// Without BatchNorm, backward: the ReLU's gradient and the bias's in
    /// one kernel of vggctl's own (fp16, channels-last).
    ReluBiasGrad,
    /// BatchNorm and ReLU in one cuDNN pass each way (fp16, channels-last).
    BnRelu,
    /// BatchNorm and ReLU (where no max-pool follows) in kernels of
    /// vggctl's own: one pass forward, a reduction and one pass backward
    /// (fp16, channels-last); where it runs, `BnRelu`'s cuDNN pass does not.
    BnReluOwn,
    /// BatchNorm, ReLU and the max-pool after them in kernels of vggctl's
    /// own: one pass forward, a reduction over the pooled gradient and one
    /// pass backward (fp16, channels-last, 1-byte pool indices).
    BnReluPool,
    /// Half precision: the weights cast once per step, not per use.
    CastOnce,
    /// Half precision, channels-last: the first convolution's 3 input
    /// channels zero-padded to 8.
    PadInput,
    /// Backward: each convolution's weight gradient on a second CUDA stream
    /// beside its input gradient.
    TwoStreams,
}

impl Choice for StepPart {
    const ALL: &'static [Self] = &[
        StepPart::NoBias,
        StepPart::ConvRelu,
        StepPart::ReluBiasGrad,
        StepPart::BnRelu,
        StepPart::BnReluOwn,
        StepPart::BnReluPool,
        StepPart::CastOnce,
        StepPart::PadInput,
        StepPart::TwoStreams,
    ];

    fn name(self) -> &'static str {
        match self {
            StepPart::NoBias => "no-bias",
            StepPart::ConvRelu => "conv-relu",
            StepPart::ReluBiasGrad => "relu-bias-grad",
            StepPart::BnRelu => "bn-relu",
            StepPart::BnReluOwn => "bn-relu-own",
            StepPart::BnReluPool => "bn-relu-pool",
            StepPart::CastOnce => "cast-once",
            StepPart::PadInput => "pad-input",
            StepPart::TwoStreams => "two-streams",
        }
    }

    fn help(self) -> &'static str {
        match self {
            StepPart::NoBias => "convolutions before BatchNorm without their zero bias",
            StepPart::ConvRelu => {
                "without BatchNorm: convolution, bias and ReLU in one cuDNN kernel"
            }
            StepPart::ReluBiasGrad => {
                "without BatchNorm, backward: the ReLU's gradient and the bias's in one kernel of vggctl's own (fp16, channels-last)"
            }
            StepPart::BnRelu => {
                "BatchNorm and ReLU in one cuDNN pass each way (fp16, channels-last)"
            }
            StepPart::BnReluOwn => {
                "BatchNorm and ReLU where no max-pool follows, in kernels of vggctl's own instead of bn-relu's cuDNN pass: one pass forward, BatchNorm's sums and one pass backward (fp16, channels-last)"
            }
            StepPart::BnReluPool => {
                "BatchNorm, ReLU and the max-pool after them in kernels of vggctl's own: one pass forward, BatchNorm's sums over the pooled gradient and one pass backward (fp16, channels-last; 1-byte pool indices)"
            }
            StepPart::CastOnce => "half precision: the weights cast once per step, not per use",
            StepPart::PadInput => {
                "half precision, channels-last: the first convolution's 3 input channels zero-padded to 8 (tensor-core kernels want multiples of 8)"
            }
            StepPart::TwoStreams => {
                "backward: each convolution's weight gradient on a second CUDA stream, beside its input gradient"
            }
        }
    }
}

/// A set of [`StepPart`]s: those a run may use (the request), or those it
/// uses once the trainer has fitted them to the model and the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedStep(u16);

impl FusedStep {
    /// The reference step: libtorch's kernels as they are.
    pub const NONE: FusedStep = FusedStep(0);

    /// Every part but `left_out`.
    pub fn without(left_out: &[StepPart]) -> FusedStep {
        let mut parts = FusedStep::NONE;
        for &p in StepPart::ALL {
            parts.set(p, !left_out.contains(&p));
        }
        parts
    }

    fn bit(part: StepPart) -> u16 {
        let i = StepPart::ALL.iter().position(|&p| p == part);
        1 << i.expect("every part is in ALL")
    }

    pub fn has(self, part: StepPart) -> bool {
        self.0 & Self::bit(part) != 0
    }

    pub fn set(&mut self, part: StepPart, on: bool) {
        match on {
            true => self.0 |= Self::bit(part),
            false => self.0 &= !Self::bit(part),
        }
    }

    pub fn any(self) -> bool {
        self.0 != 0
    }

    /// The parts' names, comma-separated, in `StepPart::ALL`'s order.
    pub fn names(self) -> String {
        let on = StepPart::ALL.iter().filter(|&&p| self.has(p));
        on.map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::Numerics;

    /// A run may leave out any part of the fused step; `ran_as` names the
    /// parts it uses.
    #[test]
    fn fused_step_parts_are_left_out_by_name() {
        let all = FusedStep::without(&[]);
        assert_eq!(
            all.names(),
            "no-bias, conv-relu, relu-bias-grad, bn-relu, bn-relu-own, bn-relu-pool, cast-once, pad-input, two-streams"
        );
        let some = FusedStep::without(&[
            StepPart::ConvRelu,
            StepPart::NoBias,
            StepPart::ReluBiasGrad,
            StepPart::BnReluOwn,
        ]);
        assert_eq!(
            some.names(),
            "bn-relu, bn-relu-pool, cast-once, pad-input, two-streams"
        );
        assert!(!some.has(StepPart::NoBias) && some.has(StepPart::CastOnce));
        assert!(!FusedStep::without(StepPart::ALL).any());
        let n = Numerics {
            fused_step: some,
            ..Numerics::plain_cpu()
        };
        assert_eq!(
            n.ran_as(None),
            "fp32, fused step (bn-relu, bn-relu-pool, cast-once, pad-input, two-streams)"
        );
    }
}
