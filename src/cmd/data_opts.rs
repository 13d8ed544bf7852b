//! The dataset options shared by train, eval and finetune.

use std::path::PathBuf;

use anyhow::{Result, bail};
use vggctl::data::Dataset;
use vggctl::data::cifar::{self, DownloadSource};

use super::progress::download_bar;

#[derive(clap::Args, Debug, Clone)]
pub struct DataOpts {
    /// Dataset: cifar10.
    #[arg(long, default_value = "cifar10")]
    pub dataset: String,
    /// Directory holding cifar-10-batches-py/ (torchvision's) or cifar-10-batches-bin/.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Where to download the binary CIFAR-10 archive from when it is missing.
    #[arg(long, env = "VGGCTL_CIFAR10_URL", default_value = cifar::URL)]
    pub data_url: String,
    /// MD5 the downloaded archive must have (the official archive's by default).
    #[arg(long, env = "VGGCTL_CIFAR10_MD5", default_value = cifar::MD5, hide = true)]
    pub data_md5: String,
    /// Never download; fail if the data is not in --data-dir.
    #[arg(long)]
    pub no_download: bool,
}

impl DataOpts {
    pub fn load(&self, quiet: bool) -> Result<Dataset> {
        match self.dataset.as_str() {
            "cifar10" => {
                let src = DownloadSource {
                    url: self.data_url.clone(),
                    md5: self.data_md5.clone(),
                };
                let src = (!self.no_download).then_some(&src);
                cifar::load(&self.data_dir, src, &mut download_bar(quiet))
            }
            other => bail!("unknown dataset '{other}' (expected cifar10)"),
        }
    }
}
