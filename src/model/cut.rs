//! A model cut at a module, as torchvision's `create_feature_extractor`
//! with one return node computes it (`features --layer`, `export
//! --layer`): how far its head runs ([`Tail`]), its feature maps
//! optionally pooled ([`Pool`]), and the shape of what it outputs.

use anyhow::{Result, bail};
use tch::Tensor;

use super::{Layer, Sequential, Vgg};

/// How far a model's head runs: all of it, or, for a model cut at a
/// module ([`Vgg::cut`]), up to `features`' last layer kept, `avgpool` or
/// `flatten`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tail {
    Features,
    Avgpool,
    Flatten,
    Classifier,
}

/// Global pooling of feature maps over their height and width, one value
/// per channel (`features --pool`, `export --layer --pool`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Avg,
    Max,
}

impl crate::choice::Choice for Pool {
    const ALL: &'static [Self] = &[Pool::Avg, Pool::Max];

    fn name(self) -> &'static str {
        match self {
            Pool::Avg => "avg",
            Pool::Max => "max",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Pool::Avg => "global average pooling (`x.mean((2, 3))`)",
            Pool::Max => "global max pooling (`x.amax((2, 3))`)",
        }
    }
}

impl Pool {
    /// `y` (`N x C x H x W`) pooled to `N x C`.
    pub fn apply(self, y: &Tensor) -> Tensor {
        match self {
            Pool::Avg => y.mean_dim([2, 3].as_slice(), false, y.kind()),
            Pool::Max => y.amax([2, 3], false),
        }
    }
}

impl Vgg {
    /// The model up to and including the module at `position` (an index
    /// into `spec.layers()`), sharing its tensors: what torchvision's
    /// `create_feature_extractor` with that one return node computes.
    pub fn cut(&self, position: usize) -> Vgg {
        let nf = self.features.layers.len();
        let kept = |s: &Sequential, n: usize| {
            let layers = s.layers.iter().take(n);
            Sequential::new(layers.map(|(k, l)| (k.clone(), l.shallow())).collect())
        };
        let (features, tail, classifier) = match position {
            p if p < nf => (kept(&self.features, p + 1), Tail::Features, 0),
            p if p == nf => (kept(&self.features, nf), Tail::Avgpool, 0),
            p if p == nf + 1 => (kept(&self.features, nf), Tail::Flatten, 0),
            p => (kept(&self.features, nf), Tail::Classifier, p - nf - 1),
        };
        let mut cut = Vgg::of(
            self.spec,
            features,
            self.pool_size,
            kept(&self.classifier, classifier),
        );
        cut.tail = tail;
        cut
    }

    /// This cut model with its output maps pooled by `pool`: an error for
    /// a model whose output is a vector (cut at `flatten` or later).
    pub fn pooled(mut self, pool: Pool) -> Result<Vgg> {
        if self.tail > Tail::Avgpool {
            bail!("gives a vector per image, with no height and width to pool");
        }
        self.pool = Some(pool);
        Ok(self)
    }

    /// Whether this is the whole model, not one [`Vgg::cut`] short of its logits.
    pub fn is_whole(&self) -> bool {
        let classifier = self.spec.head_layers().len() - 2;
        self.tail == Tail::Classifier && self.classifier.layers.len() == classifier
    }

    /// The shape of one input's output (batch dimension left out) for
    /// `input` x `input` images.
    pub fn output_shape(&self, input: i64) -> Vec<i64> {
        let (mut channels, mut side) = (3, input);
        for (_, layer) in &self.features.layers {
            match layer {
                Layer::Conv { weight, .. } => channels = weight.size()[0],
                Layer::MaxPool => side /= 2,
                _ => {}
            }
        }
        let p = self.pool_size;
        let linear = self
            .classifier
            .layers
            .iter()
            .rev()
            .find_map(|(_, l)| match l {
                Layer::Linear { weight, .. } => Some(weight.size()[0]),
                _ => None,
            });
        match self.tail {
            _ if self.pool.is_some() => vec![channels],
            Tail::Features => vec![channels, side, side],
            Tail::Avgpool => vec![channels, p, p],
            Tail::Flatten => vec![channels * p * p],
            Tail::Classifier => vec![linear.unwrap_or(channels * p * p)],
        }
    }
}
