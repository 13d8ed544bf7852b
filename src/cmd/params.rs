//! `vggctl params`: the parameter report for one model.

use anyhow::Result;
use vggctl::model::Head;
use vggctl::report::{params_report, render_table};

use super::opts::ModelOpts;
use super::output::{as_usage, print_json, print_out, whole};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,
    /// Input height and width [default: 224 for the imagenet head, 32 otherwise].
    #[arg(long, value_parser = whole::<i64>)]
    input: Option<i64>,
}

pub fn run(args: Args) -> Result<()> {
    let spec = args.model.spec(Head::Imagenet)?;
    let input = args
        .input
        .unwrap_or(if spec.head == Head::Imagenet { 224 } else { 32 });
    // Every failure of the report is about the input size asked for.
    let report = params_report(&spec, input).map_err(as_usage)?;
    if args.model.json {
        print_json(&report)
    } else {
        print_out(&render_table(&report))
    }
}
