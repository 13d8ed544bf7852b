//! `vggctl train`: the CIFAR-10 recipe, with resumable checkpoints.

use anyhow::Result;
use vggctl::model::{Head, Vgg};

use super::data_opts::DataOpts;
use super::opts::ModelOpts;
use super::training::{HyperOpts, execute, resume};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelOpts,
    #[command(flatten)]
    pub data: DataOpts,
    #[command(flatten)]
    pub hyper: HyperOpts,
}

pub fn run(args: Args) -> Result<()> {
    let h = &args.hyper;
    h.validate(&args.data)?;
    let device = args.model.device()?;
    if h.resume.is_some() {
        return resume(h, &args.data, device, args.model.json);
    }
    let config = h.config(args.model.spec(Head::Cifar)?, &args.data, device, 100);
    tch::manual_seed(config.seed as i64);
    let model = Vgg::new(config.model, device);
    execute(config, h, &args.data, model, None, args.model.json)
}
