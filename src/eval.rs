//! Evaluation of a classifier on a split: loss, top-1/top-5, per-class
//! accuracy and the confusion matrix, summed on the device (no host
//! synchronization per batch) and, on CUDA, with full batches replayed from
//! a CUDA graph. Training's per-epoch evaluation and `vggctl eval` both
//! call [`evaluate`].

use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::data::augment::Preprocess;
use crate::data::{Images, Split};
use crate::device::synchronize;
use crate::dist::World;
use crate::infer::Logits;
use crate::shim::CudaGraph;

/// Full evaluation of a model on a split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub images: i64,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    /// Per class, by its index: accuracy (recall, percent; `None` for a
    /// class with no images), precision (percent; `None` when nothing was
    /// predicted as it) and how many images it has.
    pub per_class: Vec<Option<f64>>,
    pub precision: Vec<Option<f64>>,
    /// Per class: F1, the harmonic mean of recall and precision (percent;
    /// `None` for a class neither present nor predicted).
    #[serde(default)]
    pub f1: Vec<Option<f64>>,
    pub support: Vec<i64>,
    /// `confusion[true][predicted]`; scored over some of a model's classes,
    /// each row has one more count: predicted as another of its classes.
    pub confusion: Vec<Vec<i64>>,
    /// Throughput after the first batch (which pays for cuDNN's algorithm
    /// search), preprocessing included.
    #[serde(default)]
    pub images_per_s: f64,
    /// Streamed images that could not be read (not in `images`).
    #[serde(default)]
    pub skipped: i64,
    /// Each image's prediction, in the split's order, when the scoring
    /// asks for them (`Scoring::each_image`).
    #[serde(skip)]
    pub each: Vec<ImagePrediction>,
}

impl EvalResult {
    /// The 95 % Wilson score interval of the top-1 accuracy, in percent:
    /// how far the accuracy on this many images may be from the model's
    /// on the population they were drawn from (`scipy.stats.binomtest(k,
    /// n).proportion_ci(method="wilson")`).
    pub fn top1_interval(&self) -> [f64; 2] {
        let n = self.images as f64;
        if self.images <= 0 {
            return [0.0, 100.0];
        }
        let k = (self.top1 * n / 100.0).round();
        wilson_interval(k, n).map(|v| 100.0 * v)
    }
}

/// The two-sided 95 % Wilson score interval of `k` successes in `n` trials,
/// as scipy computes it.
pub fn wilson_interval(k: f64, n: f64) -> [f64; 2] {
    // The normal distribution's 97.5 % quantile (scipy's ndtri(0.975)).
    const Z: f64 = 1.959_963_984_540_054;
    let p = k / n;
    let denom = 2.0 * (n + Z * Z);
    let centre = (2.0 * n * p + Z * Z) / denom;
    let half = Z * (Z * Z + 4.0 * n * p * (1.0 - p)).sqrt() / denom;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// One evaluated image: its index in the split, its label, the data's
/// class predicted (over some of the model's classes, `Scoring::classes()`
/// stands for another of the model's), the model's own index of that class,
/// and the softmax probabilities of the prediction and of the label.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePrediction {
    pub index: i64,
    pub label: i64,
    pub predicted: i64,
    pub model_class: i64,
    pub probability: f64,
    pub label_probability: f64,
}

/// An [`ImagePrediction`]'s figures after its index, as one row of
/// [`ROW`] f64 on the device.
const ROW: i64 = 5;

impl ImagePrediction {
    fn from_row(index: i64, row: &[f64]) -> Self {
        ImagePrediction {
            index,
            label: row[0] as i64,
            predicted: row[1] as i64,
            model_class: row[2] as i64,
            probability: row[3],
            label_probability: row[4],
        }
    }
}

/// What a model's outputs are scored against: the data's classes, which
/// are the model's own, or some of them (`subset`: the model's index of
/// each of the data's classes, in the data's order). Over a subset, the
/// loss and top-k are the whole model's, and the confusion matrix has one
/// more column: predicted as one of the model's other classes. With
/// `each_image`, every image's prediction is kept too.
#[derive(Clone, Debug, PartialEq)]
pub struct Scoring {
    /// The model's outputs.
    pub outputs: i64,
    pub subset: Option<Vec<i64>>,
    pub each_image: bool,
}

impl From<i64> for Scoring {
    fn from(outputs: i64) -> Self {
        Scoring {
            outputs,
            subset: None,
            each_image: false,
        }
    }
}

impl Scoring {
    /// The data's classes.
    pub fn classes(&self) -> i64 {
        self.subset
            .as_ref()
            .map_or(self.outputs, |s| s.len() as i64)
    }

    /// The confusion matrix's columns: the data's classes, and "another of
    /// the model's" over a subset.
    pub fn columns(&self) -> i64 {
        self.classes() + i64::from(self.subset.is_some())
    }
}

/// A model's logits for some of its classes only (`indices`, in that
/// order): a classifier of those classes.
pub struct AmongClasses<L> {
    net: L,
    indices: Tensor,
}

impl<L: Logits> AmongClasses<L> {
    pub fn new(net: L, indices: &[i64], device: Device) -> Self {
        AmongClasses {
            net,
            indices: Tensor::from_slice(indices).to_device(device),
        }
    }
}

impl<L: Logits> Logits for AmongClasses<L> {
    fn logits(&self, x: &Tensor) -> Tensor {
        self.net.logits(x).index_select(1, &self.indices)
    }
}

/// Running sums of an evaluation, on the device: summed loss, top-5 hits,
/// and the confusion counts (`true * columns + predicted`).
struct EvalSums {
    outputs: i64,
    columns: i64,
    /// Over a subset: the data's labels as the model's indices, and the
    /// model's indices as the data's (its other classes as `columns - 1`).
    to_model: Option<Tensor>,
    to_data: Option<Tensor>,
    loss: Tensor,
    top5: Tensor,
    confusion: Tensor,
    each_image: bool,
}

impl EvalSums {
    fn new(scoring: &Scoring, dev: Device) -> Self {
        let columns = scoring.columns();
        let (to_model, to_data) = match &scoring.subset {
            Some(s) => {
                let mut back = vec![columns - 1; scoring.outputs as usize];
                for (i, &m) in s.iter().enumerate() {
                    back[m as usize] = i as i64;
                }
                let t = |v: &[i64]| Some(Tensor::from_slice(v).to_device(dev));
                (t(s), t(&back))
            }
            None => (None, None),
        };
        EvalSums {
            outputs: scoring.outputs,
            columns,
            to_model,
            to_data,
            loss: Tensor::zeros([], (Kind::Double, dev)),
            top5: Tensor::zeros([], (Kind::Int64, dev)),
            confusion: Tensor::zeros([scoring.classes() * columns], (Kind::Int64, dev)),
            each_image: scoring.each_image,
        }
    }

    fn zero(&mut self) {
        let _ = self.loss.zero_();
        let _ = self.top5.zero_();
        let _ = self.confusion.zero_();
    }

    /// Adds one uint8 batch's figures: device work only, in place, no host
    /// synchronization (so a CUDA graph can capture it). Returns each
    /// image's figures (`ROW` f64 a row) when the scoring keeps them.
    fn add(&mut self, net: &dyn Logits, pre: &Preprocess, batch: &Split) -> Option<Tensor> {
        let y = &batch.labels;
        let as_model = |t: &Tensor| match &self.to_model {
            Some(m) => m.index_select(0, t),
            None => t.shallow_clone(),
        };
        let logits = net.logits(&pre.batch(batch, false));
        let target = as_model(y);
        let loss = logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, -100, 0.0);
        self.loss += loss.to_kind(Kind::Double);
        let model_class = logits.argmax(-1, false);
        let pred = match &self.to_data {
            Some(d) => d.index_select(0, &model_class),
            None => model_class.shallow_clone(),
        };
        // index_add_, not bincount: bincount's output size is read on the host.
        let cell = y * self.columns + &pred;
        let _ = self
            .confusion
            .index_add_(0, &cell, &pred.ones_like().to_kind(Kind::Int64));
        let topk = logits.topk(self.outputs.min(5), -1, true, true).1;
        self.top5 += topk
            .eq_tensor(&target.unsqueeze(1))
            .any_dim(1, false)
            .sum(Kind::Int64);
        self.each_image.then(|| {
            let p = logits.softmax(-1, Kind::Double);
            let at = |i: &Tensor| p.gather(1, &i.unsqueeze(1), false).squeeze_dim(1);
            let as_f64 = |t: &Tensor| t.to_kind(Kind::Double);
            Tensor::stack(
                &[
                    as_f64(y),
                    as_f64(&pred),
                    as_f64(&model_class),
                    at(&model_class),
                    at(&target),
                ],
                1,
            )
        })
    }

    /// The figures for `n` images, read from the device.
    fn result(&self, n: i64, images_per_s: f64) -> EvalResult {
        let confusion: Vec<i64> =
            Vec::<i64>::try_from(self.confusion.to_device(Device::Cpu)).unwrap_or_default();
        let rows: Vec<Vec<i64>> = confusion
            .chunks(self.columns as usize)
            .map(|r| r.to_vec())
            .collect();
        let classes = rows.len();
        let correct: i64 = (0..classes).map(|c| rows[c][c]).sum();
        let percent = |hits: i64, of: i64| (of > 0).then(|| 100.0 * hits as f64 / of as f64);
        let support: Vec<i64> = rows.iter().map(|r| r.iter().sum()).collect();
        let per_class = (0..classes)
            .map(|c| percent(rows[c][c], support[c]))
            .collect();
        let precision = (0..classes)
            .map(|c| percent(rows[c][c], rows.iter().map(|r| r[c]).sum()))
            .collect();
        // 2·tp / (2·tp + fp + fn): defined wherever the class was present
        // or predicted (scikit-learn's f1_score).
        let f1 = (0..classes)
            .map(|c| {
                let predicted: i64 = rows.iter().map(|r| r[c]).sum();
                percent(2 * rows[c][c], support[c] + predicted)
            })
            .collect();
        let nf = n.max(1) as f64;
        EvalResult {
            images: n,
            loss: self.loss.double_value(&[]) / nf,
            top1: 100.0 * correct as f64 / nf,
            top5: 100.0 * self.top5.int64_value(&[]) as f64 / nf,
            per_class,
            precision,
            f1,
            support,
            confusion: rows,
            images_per_s,
            skipped: 0,
            each: Vec::new(),
        }
    }
}

/// The evaluation step as a CUDA graph (see `train::graphed` for
/// training): preprocessing, forward and the sums on a static full batch; a
/// partial last batch runs eagerly into the same sums.
pub struct EvalGraph {
    graph: CudaGraph,
    /// The static input batch, and the sums the graph adds into.
    io: Option<Split>,
    sums: EvalSums,
    /// The captured batch's per-image figures (`Scoring::each_image`).
    rows: Option<Tensor>,
}

impl EvalGraph {
    pub fn new(device: Device, scoring: &Scoring) -> Result<Self> {
        Ok(EvalGraph {
            graph: CudaGraph::new(device)?,
            io: None,
            sums: EvalSums::new(scoring, device),
            rows: None,
        })
    }

    /// One full batch; its per-image figures are a copy of the graph's.
    fn batch(
        &mut self,
        net: &dyn Logits,
        pre: &Preprocess,
        batch: &Split,
    ) -> Result<Option<Tensor>> {
        let sums = &mut self.sums;
        if self.graph.warming_up() {
            return self.graph.on_side_stream(|_| Ok(sums.add(net, pre, batch)));
        }
        match &mut self.io {
            Some(io) => io.fill(batch),
            None => {
                let io = batch.copy();
                self.rows = self
                    .graph
                    .on_side_stream(|g| g.capture(|| sums.add(net, pre, &io)))?;
                self.io = Some(io);
            }
        }
        self.graph.replay()?;
        Ok(self.rows.as_ref().map(Tensor::copy))
    }
}

/// Loss, top-1/top-5, per-class accuracy and the confusion matrix of `net`
/// (its outputs scored as `scoring` says) on `data`, in batches of `batch`; full batches
/// through a CUDA graph when one is given. Over several ranks, each
/// evaluates its contiguous part and the sums are added up, so the counts
/// are exactly one process's. Streamed images that cannot be read are
/// left out (and counted in `skipped`).
pub fn evaluate(
    net: &dyn Logits,
    scoring: &Scoring,
    data: &Images,
    batch: i64,
    pre: &Preprocess,
    mut graph: Option<&mut EvalGraph>,
    world: &World,
) -> Result<EvalResult> {
    let (first, n) = world.range_of(data.len());
    let dev = pre.device();
    let mut batches = data.in_order(first, n, batch, pre.stream_transform(false), dev)?;
    tch::no_grad(|| {
        let mut own = EvalSums::new(scoring, dev);
        if let Some(g) = graph.as_mut() {
            g.sums.zero();
        }
        let (mut seen, mut each) = (0, Each::default());
        let mut clock: Option<(Instant, i64)> = None;
        while let Some(b) = batches.next_batch()? {
            if seen > 0 && clock.is_none() {
                synchronize(dev);
                clock = Some((Instant::now(), seen));
            }
            let len = b.len();
            let rows = match graph.as_mut() {
                Some(g) if len == batch => g.batch(net, pre, &b)?,
                Some(g) => g.sums.add(net, pre, &b),
                None if len > 0 => own.add(net, pre, &b),
                None => None,
            };
            if let Some(rows) = rows {
                each.rows.push(rows);
                each.indices.extend_from_slice(batches.indices());
            }
            seen += len;
        }
        let images_per_s = match clock {
            Some((t, from)) => (seen - from) as f64 / t.elapsed().as_secs_f64().max(1e-9),
            None => 0.0,
        };
        let sums = graph.map_or(&own, |g| &g.sums);
        for t in [&sums.loss, &sums.top5, &sums.confusion] {
            world.sum(t)?;
        }
        let mut total = [seen as f64, batches.skipped().len() as f64];
        world.sum_f64(&mut total)?;
        let mut result = sums.result(total[0] as i64, images_per_s);
        result.skipped = total[1] as i64;
        if scoring.each_image {
            result.each = each.gathered(data.len(), dev, world)?;
        }
        Ok(result)
    })
}

/// The per-image figures of a rank's part, as evaluated: rows on the
/// device, and each row's index in the split.
#[derive(Default)]
struct Each {
    rows: Vec<Tensor>,
    indices: Vec<i64>,
}

impl Each {
    /// Every rank's images of a split of `n`, in the split's order: each
    /// rank writes its rows into its places of one table, a column saying
    /// which places hold an image, and the tables are summed.
    fn gathered(self, n: i64, dev: Device, world: &World) -> Result<Vec<ImagePrediction>> {
        let mut table = Tensor::zeros([n, ROW + 1], (Kind::Double, dev));
        if !self.rows.is_empty() {
            let rows = Tensor::cat(&self.rows, 0);
            let held = rows.ones_like().narrow(1, 0, 1);
            let at = Tensor::from_slice(&self.indices).to_device(dev);
            let _ = table.index_copy_(0, &at, &Tensor::cat(&[held, rows], 1));
        }
        world.sum(&table)?;
        let flat = Vec::<f64>::try_from(table.to_device(Device::Cpu).view([-1]))?;
        Ok(flat
            .chunks((ROW + 1) as usize)
            .enumerate()
            .filter(|(_, row)| row[0] == 1.0)
            .map(|(i, row)| ImagePrediction::from_row(i as i64, &row[1..]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interval holds the observed rate, stays in [0, 1], is the
    /// mirror image for failures, narrows with more trials, and at 0 or n
    /// successes touches 0 or 1.
    #[test]
    fn wilson_intervals_behave() {
        for (k, n) in [
            (0.0, 10.0),
            (3.0, 10.0),
            (93.0, 100.0),
            (9312.0, 10000.0),
            (10.0, 10.0),
        ] {
            let [lo, hi] = wilson_interval(k, n);
            assert!(
                (0.0..=k / n).contains(&lo) && (k / n..=1.0).contains(&hi),
                "{k}/{n}"
            );
            let [mlo, mhi] = wilson_interval(n - k, n);
            assert!((lo - (1.0 - mhi)).abs() < 1e-12 && (hi - (1.0 - mlo)).abs() < 1e-12);
        }
        assert_eq!(wilson_interval(0.0, 10.0)[0], 0.0);
        assert_eq!(wilson_interval(10.0, 10.0)[1], 1.0);
        let width = |n: f64| {
            let [lo, hi] = wilson_interval(0.9 * n, n);
            hi - lo
        };
        assert!(width(10000.0) < width(100.0));
    }
}
