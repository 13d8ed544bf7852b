//! `--format pt2`: a `torch.export` archive (an ExportedProgram, PyTorch 2's
//! deployment format) written by vggctl itself: `torch.export.load` runs
//! it, `torch.compile` and AOTInductor compile it, ExecuTorch lowers it.
//!
//! The graph is the one `torch.export.export` makes of torchvision's VGG in
//! eval mode (the ATen ops of its training IR: `conv2d`, `batch_norm`,
//! `relu_`, `max_pool2d`, `adaptive_avg_pool2d`, `flatten.using_ints`,
//! `linear`, `dropout` with `train=False`), with a free batch dimension and
//! the input side fixed; parameters and buffers are lifted as graph inputs
//! under torchvision's state-dict names. The archive's layout and the JSON
//! schema are PyTorch's `torch/export/pt2_archive` and
//! `torch/_export/serde/schema.py` at [`SCHEMA_VERSION`].

use std::collections::HashMap;
use std::io::{Seek, Write};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use tch::{Kind, Tensor};
use zip::ZipWriter;
use zip::write::SimpleFileOptions;

use crate::checkpoint::ModelMeta;
use crate::device::LIBTORCH_VERSION;
use crate::formats::safetensors::tensor_bytes;
use crate::model::{BN_EPS, BN_MOMENTUM, Layer, Pool, Tail, Vgg, check_input};

/// The serialized ExportedProgram's schema version that torch 2.11 writes
/// and reads (`torch._export.serde.schema.SCHEMA_VERSION`).
pub const SCHEMA_VERSION: (i64, i64) = (8, 17);
/// The batch dimension's symbol, and the example batch size it was traced at.
const BATCH: &str = "s0";
const EXAMPLE_BATCH: i64 = 2;
/// torch's serialized enums: ScalarType FLOAT and LONG, Layout Strided.
const FLOAT: i64 = 7;
const LONG: i64 = 5;
const STRIDED: i64 = 7;

/// One dimension of a tensor in the graph: the free batch, or a number.
#[derive(Clone, Copy)]
enum Dim {
    Batch,
    Fixed(i64),
}

fn dim_json(d: Dim) -> Value {
    match d {
        Dim::Batch => json!({"as_expr": {
            "expr_str": format!("Symbol('{BATCH}', positive=True, integer=True)"),
            "hint": {"as_int": EXAMPLE_BATCH}
        }}),
        Dim::Fixed(n) => json!({"as_int": n}),
    }
}

/// A contiguous tensor's metadata (the batch only ever leads, so every
/// stride is a number).
fn tensor_meta(dtype: i64, sizes: &[Dim], requires_grad: bool) -> Value {
    let mut strides = vec![0i64; sizes.len()];
    let mut acc = 1;
    for (i, d) in sizes.iter().enumerate().rev() {
        strides[i] = acc;
        if let Dim::Fixed(n) = d {
            acc *= n;
        }
    }
    json!({
        "dtype": dtype,
        "sizes": sizes.iter().map(|&d| dim_json(d)).collect::<Vec<_>>(),
        "requires_grad": requires_grad,
        "device": {"type": "cpu", "index": null},
        "strides": strides.iter().map(|s| json!({"as_int": s})).collect::<Vec<_>>(),
        "storage_offset": {"as_int": 0},
        "layout": STRIDED,
    })
}

fn fixed(t: &Tensor) -> Vec<Dim> {
    t.size().into_iter().map(Dim::Fixed).collect()
}

fn tensor_arg(name: &str) -> Value {
    json!({"as_tensor": {"name": name}})
}

/// A parameter or buffer lifted into a graph input.
struct Lifted {
    fqn: String,
    arg: String,
    tensor: Tensor,
    is_param: bool,
}

/// Builds the graph node by node; `current` is the activation so far.
struct Builder {
    nodes: Vec<Value>,
    values: Map<String, Value>,
    used: HashMap<String, usize>,
    lifted: Vec<Lifted>,
    current: String,
    shape: Vec<Dim>,
}

impl Builder {
    /// torch.fx's names: `conv2d`, `conv2d_1`, ...
    fn fresh(&mut self, base: &str) -> String {
        let n = self.used.entry(base.to_string()).or_insert(0);
        let name = if *n == 0 {
            base.to_string()
        } else {
            format!("{base}_{n}")
        };
        *n += 1;
        name
    }

    /// Lifts a model tensor into a graph input (`p_features_0_weight`).
    fn lift(&mut self, fqn: String, t: &Tensor, is_param: bool) -> Value {
        let arg = format!(
            "{}_{}",
            if is_param { "p" } else { "b" },
            fqn.replace('.', "_")
        );
        let dtype = if t.kind() == Kind::Int64 { LONG } else { FLOAT };
        let meta = tensor_meta(dtype, &fixed(t), is_param);
        self.values.insert(arg.clone(), meta);
        self.lifted.push(Lifted {
            fqn,
            arg: arg.clone(),
            tensor: t.shallow_clone(),
            is_param,
        });
        tensor_arg(&arg)
    }

    /// Appends `target(current, args...)`, whose output has `shape`.
    fn node(&mut self, op: &str, first: &str, args: Vec<(&str, Value)>, shape: Vec<Dim>) {
        let base = op.split('.').next().unwrap_or(op);
        let name = self.fresh(base);
        let mut inputs = vec![json!({"name": first, "arg": tensor_arg(&self.current), "kind": 1})];
        inputs.extend(
            args.into_iter()
                .map(|(n, v)| json!({"name": n, "arg": v, "kind": 1})),
        );
        self.nodes.push(json!({
            "target": format!("torch.ops.aten.{op}"),
            "inputs": inputs,
            "outputs": [tensor_arg(&name)],
            "metadata": {},
            "is_hop_single_tensor_return": null,
            "name": name,
        }));
        self.values
            .insert(name.clone(), tensor_meta(FLOAT, &shape, false));
        self.current = name;
        self.shape = shape;
    }

    fn with_channels(&self, c: i64) -> Vec<Dim> {
        let mut s = self.shape.clone();
        s[1] = Dim::Fixed(c);
        s
    }

    fn layer(&mut self, name: &str, layer: &Layer) -> Result<()> {
        let ints = |v: &[i64]| json!({"as_ints": v});
        match layer {
            Layer::Conv { weight, bias } => {
                let w = self.lift(format!("{name}.weight"), weight, true);
                let b = self.lift(format!("{name}.bias"), bias, true);
                let shape = self.with_channels(weight.size()[0]);
                let args = vec![
                    ("weight", w),
                    ("bias", b),
                    ("stride", ints(&[1, 1])),
                    ("padding", ints(&[1, 1])),
                ];
                self.node("conv2d.default", "input", args, shape);
            }
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                num_batches_tracked,
            } => {
                let args = vec![
                    ("weight", self.lift(format!("{name}.weight"), weight, true)),
                    ("bias", self.lift(format!("{name}.bias"), bias, true)),
                    (
                        "running_mean",
                        self.lift(format!("{name}.running_mean"), running_mean, false),
                    ),
                    (
                        "running_var",
                        self.lift(format!("{name}.running_var"), running_var, false),
                    ),
                    ("training", json!({"as_bool": false})),
                    ("momentum", json!({"as_float": BN_MOMENTUM})),
                    ("eps", json!({"as_float": BN_EPS})),
                    ("cudnn_enabled", json!({"as_bool": false})),
                ];
                // torch lifts the counter too, though eval mode reads it not.
                let count = Tensor::from(num_batches_tracked.get());
                self.lift(format!("{name}.num_batches_tracked"), &count, false);
                let shape = self.shape.clone();
                self.node("batch_norm.default", "input", args, shape);
            }
            Layer::Relu => {
                let shape = self.shape.clone();
                self.node("relu_.default", "self", vec![], shape);
            }
            Layer::MaxPool => {
                let mut shape = self.shape.clone();
                for d in &mut shape[2..] {
                    if let Dim::Fixed(n) = d {
                        *n /= 2;
                    }
                }
                let args = vec![("kernel_size", ints(&[2, 2])), ("stride", ints(&[2, 2]))];
                self.node("max_pool2d.default", "self", args, shape);
            }
            Layer::Dropout(p) => {
                let args = vec![
                    ("p", json!({"as_float": p})),
                    ("train", json!({"as_bool": false})),
                ];
                let shape = self.shape.clone();
                self.node("dropout.default", "input", args, shape);
            }
            Layer::Linear { weight, bias } => {
                let w = self.lift(format!("{name}.weight"), weight, true);
                let b = self.lift(format!("{name}.bias"), bias, true);
                let shape = vec![Dim::Batch, Dim::Fixed(weight.size()[0])];
                self.node(
                    "linear.default",
                    "input",
                    vec![("weight", w), ("bias", b)],
                    shape,
                );
            }
        }
        Ok(())
    }
}

/// The graph of `model` on `input` x `input` images: its nodes, tensor
/// values and lifted tensors (parameters first, then buffers, as torch
/// orders them).
fn build_graph(model: &Vgg, input: i64) -> Result<Builder> {
    let mut b = Builder {
        nodes: Vec::new(),
        values: Map::new(),
        used: HashMap::new(),
        lifted: Vec::new(),
        current: "x".into(),
        shape: vec![
            Dim::Batch,
            Dim::Fixed(3),
            Dim::Fixed(input),
            Dim::Fixed(input),
        ],
    };
    b.used.insert("x".into(), 1);
    b.values
        .insert("x".into(), tensor_meta(FLOAT, &b.shape.clone(), false));
    for (name, layer) in &model.features.layers {
        if matches!(layer, Layer::Linear { .. }) {
            bail!("a linear layer inside features");
        }
        b.layer(name, layer)?;
    }
    // A model cut at a module (`export --layer`) ends there.
    let p = model.pool_size;
    if model.tail >= Tail::Avgpool {
        let shape = b.with_channels(512);
        let pooled = vec![shape[0], shape[1], Dim::Fixed(p), Dim::Fixed(p)];
        let args = vec![("output_size", json!({"as_ints": [p, p]}))];
        b.node("adaptive_avg_pool2d.default", "self", args, pooled);
    }
    if let Some(pool) = model.pool {
        let op = match pool {
            Pool::Avg => "mean.dim",
            Pool::Max => "amax.default",
        };
        let pooled = vec![Dim::Batch, b.shape[1]];
        let args = vec![("dim", json!({"as_ints": [2, 3]}))];
        b.node(op, "self", args, pooled);
    }
    if model.tail >= Tail::Flatten {
        let flat = vec![Dim::Batch, Dim::Fixed(512 * p * p)];
        let args = vec![("start_dim", json!({"as_int": 1}))];
        b.node("flatten.using_ints", "self", args, flat);
    }
    if model.tail == Tail::Classifier {
        for (name, layer) in &model.classifier.layers {
            b.layer(name, layer)?;
        }
    }
    // Parameters before buffers; each group in the model's order.
    b.lifted.sort_by_key(|l| !l.is_param);
    Ok(b)
}

/// The serialized ExportedProgram (`models/model.json`).
fn program_json(b: &Builder, meta: &ModelMeta) -> Value {
    let mut inputs: Vec<Value> = b.lifted.iter().map(|l| tensor_arg(&l.arg)).collect();
    inputs.push(tensor_arg("x"));
    let mut specs: Vec<Value> = b
        .lifted
        .iter()
        .map(|l| match l.is_param {
            true => json!({"parameter": {"arg": {"name": l.arg}, "parameter_name": l.fqn}}),
            false => json!({"buffer": {
                "arg": {"name": l.arg}, "buffer_name": l.fqn, "persistent": true
            }}),
        })
        .collect();
    specs.push(json!({"user_input": {"arg": tensor_arg("x")}}));
    // pytree specs of forward((x,), {}) -> logits
    let in_spec = r#"[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", "context": "null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, {"type": "builtins.dict", "context": "[]", "children_spec": []}]}]"#;
    let out_spec = r#"[1, {"type": null, "context": null, "children_spec": []}]"#;
    // The format's one free-form place: `custom`, a JSON string that
    // torch.export.load puts into `graph_module.meta["custom"]`.
    let mut fields: Vec<(String, String)> = meta.to_metadata().into_iter().collect();
    fields.sort();
    let fields: Map<String, Value> = fields
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let custom = json!({ "vggctl": fields });
    json!({
        "graph_module": {
            "graph": {
                "inputs": inputs,
                "outputs": [tensor_arg(&b.current)],
                "nodes": b.nodes,
                "tensor_values": b.values,
                "sym_int_values": {},
                "sym_bool_values": {},
                "is_single_tensor_return": false,
                "custom_obj_values": {},
                "sym_float_values": {},
            },
            "signature": {
                "input_specs": specs,
                "output_specs": [{"user_output": {"arg": tensor_arg(&b.current)}}],
            },
            "module_call_graph": [{"fqn": "", "signature": {
                "inputs": [], "outputs": [],
                "in_spec": in_spec, "out_spec": out_spec,
                "forward_arg_names": ["x"],
            }}],
            "metadata": {"custom": custom.to_string()},
            "treespec_namedtuple_fields": {},
        },
        "opset_version": {"aten": 10},
        "range_constraints": {BATCH: {"min_val": 0, "max_val": null}},
        "schema_version": {"major": SCHEMA_VERSION.0, "minor": SCHEMA_VERSION.1},
        "verifiers": ["TRAINING"],
        "torch_version": LIBTORCH_VERSION,
        "guards_code": [],
    })
}

/// `data/weights/model_weights_config.json`: where each lifted tensor is.
fn weights_config(b: &Builder) -> Value {
    let config: Map<String, Value> = b
        .lifted
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let dtype = if l.tensor.kind() == Kind::Int64 {
                LONG
            } else {
                FLOAT
            };
            (
                l.fqn.clone(),
                json!({
                    "path_name": format!("weight_{i}"),
                    "is_param": l.is_param,
                    "use_pickle": false,
                    "tensor_meta": tensor_meta(dtype, &fixed(&l.tensor), l.is_param),
                }),
            )
        })
        .collect();
    json!({ "config": config })
}

/// `torch.save(((x,), {}))` of a zero example batch, as the archive's
/// `data/sample_inputs/model.pt` (torch.export.load reads it back): a zip
/// with one pickle (protocol 2) naming one float storage.
fn sample_inputs(input: i64) -> Result<Vec<u8>> {
    let numel = EXAMPLE_BATCH * 3 * input * input;
    // The pickle stores sizes as 32-bit ints (BININT), as torch.save's does.
    if numel > i32::MAX as i64 {
        bail!("--input {input} is too large for a pt2 archive's example input");
    }
    let mut pkl: Vec<u8> = vec![0x80, 2];
    let global = |p: &mut Vec<u8>, module: &str, name: &str| {
        p.push(b'c');
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    };
    let text = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: i64| {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    };
    global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
    pkl.extend_from_slice(b"((");
    text(&mut pkl, "storage");
    global(&mut pkl, "torch", "FloatStorage");
    text(&mut pkl, "0");
    text(&mut pkl, "cpu");
    int(&mut pkl, numel);
    pkl.extend_from_slice(b"tQ"); // the persistent id
    int(&mut pkl, 0);
    pkl.push(b'(');
    for s in [EXAMPLE_BATCH, 3, input, input] {
        int(&mut pkl, s);
    }
    pkl.push(b't');
    pkl.push(b'(');
    for s in [3 * input * input, input * input, input, 1] {
        int(&mut pkl, s);
    }
    pkl.push(b't');
    pkl.push(0x89); // requires_grad False
    global(&mut pkl, "collections", "OrderedDict");
    pkl.extend_from_slice(b")Rt"); // OrderedDict(), end of the arguments
    pkl.extend_from_slice(b"R\x85}\x86."); // rebuild, (x,), {}, ((x,), {})
    let zeros = vec![0u8; numel as usize * 4];
    let mut out = std::io::Cursor::new(Vec::new());
    let mut z = ZipWriter::new(&mut out);
    let records: [(&str, &[u8]); 7] = [
        ("archive/data.pkl", &pkl),
        ("archive/.format_version", b"1"),
        ("archive/.storage_alignment", b"64"),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &zeros),
        ("archive/version", b"3\n"),
        ("archive/.data/serialization_id", b"0"),
    ];
    for (name, bytes) in records {
        z.start_file(name, stored())?;
        z.write_all(bytes)?;
    }
    z.finish()?;
    Ok(out.into_inner())
}

fn stored() -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64)
}

/// Writes the archive for `model` (in eval mode: dropout off, BatchNorm
/// from its running statistics) to `w`; `root` is the archive's folder.
pub fn write_pt2<W: Write + Seek>(
    w: W,
    root: &str,
    model: &Vgg,
    meta: &ModelMeta,
    input: i64,
) -> Result<()> {
    check_input(input)?;
    let b = build_graph(model, input)?;
    let mut z = ZipWriter::new(w);
    for (i, l) in b.lifted.iter().enumerate() {
        z.start_file(format!("{root}/data/weights/weight_{i}"), stored())?;
        z.write_all(&tensor_bytes(&l.tensor))?;
    }
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "data/weights/model_weights_config.json".into(),
            serde_json::to_vec(&weights_config(&b))?,
        ),
        (
            "data/constants/model_constants_config.json".into(),
            br#"{"config": {}}"#.to_vec(),
        ),
        (
            "models/model.json".into(),
            serde_json::to_vec(&program_json(&b, meta))?,
        ),
        ("data/sample_inputs/model.pt".into(), sample_inputs(input)?),
        ("archive_format".into(), b"pt2".to_vec()),
        ("archive_version".into(), b"0".to_vec()),
        (".data/version".into(), b"6\n".to_vec()),
        ("byteorder".into(), b"little".to_vec()),
        (".data/serialization_id".into(), b"0".to_vec()),
    ];
    for (name, bytes) in files {
        z.start_file(format!("{root}/{name}"), stored())
            .with_context(|| format!("writing {name}"))?;
        z.write_all(&bytes)?;
    }
    z.finish()?;
    Ok(())
}
