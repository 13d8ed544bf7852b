//! Each update rule's own options: torch.optim's constructor arguments
//! besides the learning rate, SGD's momentum and the weight decay, which
//! `HyperOpts` holds with `--optimizer`.

use vggctl::optim::{DEFAULT_ALPHA, DEFAULT_MOMENTUM_DECAY, DEFAULT_RHO};

use super::output::pair;

#[derive(clap::Args, Debug, Clone)]
pub struct RuleOpts {
    /// Nesterov momentum (SGD).
    #[arg(long, help_heading = "Optimizer")]
    pub nesterov: bool,
    /// The Adam family's coefficients of the running averages of the
    /// gradient and its square (Adamax: its largest) (torch.optim's betas).
    #[arg(long, alias = "opt-betas", value_name = "B1,B2", default_value = "0.9,0.999", value_parser = pair, help_heading = "Optimizer")]
    pub betas: (f64, f64),
    /// RMSprop's smoothing constant of the squared gradients' average
    /// (torch.optim.RMSprop's alpha).
    #[arg(long, default_value_t = DEFAULT_ALPHA, help_heading = "Optimizer")]
    pub alpha: f64,
    /// The Adam family's, RMSprop's, Adagrad's and Adadelta's term added to
    /// the denominator (Adamax's: to the gradient's magnitude) (torch.optim's
    /// eps) [default: 1e-8; adagrad 1e-10, adadelta 1e-6, as torch's].
    #[arg(long, alias = "opt-eps", help_heading = "Optimizer")]
    pub eps: Option<f64>,
    /// Adam, AdamW: the AMSGrad variant (torch.optim's amsgrad).
    #[arg(long, help_heading = "Optimizer")]
    pub amsgrad: bool,
    /// RMSprop: the centered variant, normalized by the gradients'
    /// estimated variance (torch.optim's centered).
    #[arg(long, help_heading = "Optimizer")]
    pub centered: bool,
    /// NAdam's momentum decay: step t's momentum is
    /// beta1*(1 - 0.96^(t*PSI)/2) (torch.optim.NAdam's momentum_decay).
    #[arg(long, value_name = "PSI", default_value_t = DEFAULT_MOMENTUM_DECAY, help_heading = "Optimizer")]
    pub momentum_decay: f64,
    /// NAdam, RAdam: the weight decay decoupled, as AdamW's (torch.optim's
    /// decoupled_weight_decay; NAdam so is timm's nadamw).
    #[arg(long, help_heading = "Optimizer")]
    pub decoupled_weight_decay: bool,
    /// Adagrad: update t's learning rate is --lr / (1 + (t - 1) * D)
    /// (torch.optim.Adagrad's lr_decay).
    #[arg(
        long,
        value_name = "D",
        default_value_t = 0.0,
        help_heading = "Optimizer"
    )]
    pub lr_decay: f64,
    /// Adagrad: the starting value of each weight's sum of squared
    /// gradients (torch.optim.Adagrad's initial_accumulator_value).
    #[arg(
        long,
        value_name = "V",
        default_value_t = 0.0,
        help_heading = "Optimizer"
    )]
    pub initial_accumulator_value: f64,
    /// Adadelta's coefficient of its running averages of the squared
    /// gradients and steps (torch.optim.Adadelta's rho).
    #[arg(long, default_value_t = DEFAULT_RHO, help_heading = "Optimizer")]
    pub rho: f64,
}
