//! The VGG graph in ONNX: Conv, BatchNormalization (or folded), Relu,
//! MaxPool, the head's pooling, Flatten, Gemm. Inputs `input` (N x 3 x H x W,
//! N dynamic), output `logits` (a model cut at a module, `export --layer`:
//! `features`, that module's output); class names and the rest of the
//! model's metadata go into `metadata_props`.

use anyhow::{Result, bail};
use prost::Message;
use tch::{Kind, Tensor};

use super::onnx_proto::*;
use crate::checkpoint::ModelMeta;
use crate::formats::safetensors::tensor_bytes;
use crate::model::{BN_EPS, Layer, Pool, Tail, Vgg, check_input};

pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::INTS),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::INT),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attribute_type::FLOAT),
        f: Some(v),
        ..Default::default()
    }
}

fn float_tensor(name: &str, t: &Tensor) -> TensorProto {
    let t = t.detach().to_kind(Kind::Float).contiguous();
    TensorProto {
        dims: t.size(),
        data_type: Some(data_type::FLOAT),
        name: Some(name.into()),
        raw_data: Some(tensor_bytes(&t)),
    }
}

fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Some(v) => Dimension {
                dim_value: Some(*v),
                dim_param: None,
            },
            None => Dimension {
                dim_value: None,
                dim_param: Some("batch".into()),
            },
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(data_type::FLOAT),
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// Builds the graph node by node, naming each value after its module.
struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    current: String,
}

impl Builder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        extra_inputs: Vec<String>,
        attrs: Vec<AttributeProto>,
    ) {
        let mut input = vec![self.current.clone()];
        input.extend(extra_inputs);
        self.nodes.push(NodeProto {
            input,
            output: vec![name.to_string()],
            name: Some(name.into()),
            op_type: Some(op.into()),
            attribute: attrs,
        });
        self.current = name.to_string();
    }

    fn init(&mut self, name: String, t: &Tensor) -> String {
        self.inits.push(float_tensor(&name, t));
        name
    }
}

/// PyTorch's adaptive average pooling bins along one axis as a `out x len` matrix.
fn adaptive_bins(len: i64, out: i64) -> Tensor {
    let mut m = vec![0f32; (out * len) as usize];
    for i in 0..out {
        let start = (i * len) / out;
        let end = ((i + 1) * len + out - 1) / out;
        for j in start..end {
            m[(i * len + j) as usize] = 1.0 / (end - start) as f32;
        }
    }
    Tensor::from_slice(&m).view([out, len])
}

/// The convolution part: every layer of `features`; returns the side of its
/// output for an `input` x `input` image.
fn features(b: &mut Builder, model: &Vgg, input: i64) -> Result<i64> {
    let mut side = input;
    for (name, layer) in &model.features.layers {
        match layer {
            Layer::Conv { weight, bias } => {
                let w = b.init(format!("{name}.weight"), weight);
                let bi = b.init(format!("{name}.bias"), bias);
                let attrs = vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[1, 1]),
                ];
                b.node("Conv", name, vec![w, bi], attrs);
            }
            Layer::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                ..
            } => {
                let ins = vec![
                    b.init(format!("{name}.weight"), weight),
                    b.init(format!("{name}.bias"), bias),
                    b.init(format!("{name}.running_mean"), running_mean),
                    b.init(format!("{name}.running_var"), running_var),
                ];
                b.node(
                    "BatchNormalization",
                    name,
                    ins,
                    vec![attr_float("epsilon", BN_EPS as f32)],
                );
            }
            Layer::Relu => b.node("Relu", name, vec![], vec![]),
            Layer::MaxPool => {
                b.node(
                    "MaxPool",
                    name,
                    vec![],
                    vec![
                        attr_ints("kernel_shape", &[2, 2]),
                        attr_ints("strides", &[2, 2]),
                    ],
                );
                side /= 2;
            }
            Layer::Dropout(_) => {}
            Layer::Linear { .. } => bail!("a linear layer inside features"),
        }
    }
    Ok(side)
}

/// The head's adaptive average pooling of a `side` x `side` map to the
/// model's pool size, in the ONNX ops that compute it exactly.
fn avgpool(b: &mut Builder, side: i64, p: i64) {
    if p == 1 {
        b.node("GlobalAveragePool", "avgpool", vec![], vec![]);
    } else if side != p && side % p == 0 {
        let k = side / p;
        b.node(
            "AveragePool",
            "avgpool",
            vec![],
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("strides", &[k, k]),
            ],
        );
    } else if side != p {
        // No adaptive pooling in ONNX: the same bins as two matrix products.
        let bins = adaptive_bins(side, p);
        let cols = b.init("avgpool.cols".into(), &bins.transpose(0, 1).contiguous());
        b.node("MatMul", "avgpool.w", vec![cols], vec![]);
        let rows = b.init("avgpool.rows".into(), &bins);
        let x = b.current.clone();
        b.nodes.push(NodeProto {
            input: vec![rows, x],
            output: vec!["avgpool".into()],
            name: Some("avgpool".into()),
            op_type: Some("MatMul".into()),
            attribute: vec![],
        });
        b.current = "avgpool".into();
    }
}

fn classifier(b: &mut Builder, model: &Vgg) -> Result<()> {
    for (name, layer) in &model.classifier.layers {
        match layer {
            Layer::Linear { weight, bias } => {
                let w = b.init(format!("{name}.weight"), weight);
                let bi = b.init(format!("{name}.bias"), bias);
                b.node("Gemm", name, vec![w, bi], vec![attr_int("transB", 1)]);
            }
            Layer::Relu => b.node("Relu", name, vec![], vec![]),
            Layer::Dropout(_) => {}
            _ => bail!("unexpected layer {name} in the classifier"),
        }
    }
    Ok(())
}

pub fn model_bytes(model: &Vgg, meta: &ModelMeta, input: i64, folded: bool) -> Result<Vec<u8>> {
    check_input(input)?;
    let mut b = Builder {
        nodes: Vec::new(),
        inits: Vec::new(),
        current: "input".into(),
    };
    let side = features(&mut b, model, input)?;
    if model.tail >= Tail::Avgpool {
        avgpool(&mut b, side, model.pool_size);
    }
    if let Some(pool) = model.pool {
        let op = match pool {
            Pool::Avg => "ReduceMean",
            Pool::Max => "ReduceMax",
        };
        let attrs = vec![attr_ints("axes", &[2, 3]), attr_int("keepdims", 0)];
        b.node(op, "pool", vec![], attrs);
    }
    if model.tail >= Tail::Flatten {
        b.node("Flatten", "flatten", vec![], vec![attr_int("axis", 1)]);
    }
    if model.tail == Tail::Classifier {
        classifier(&mut b, model)?;
    }
    // The last node's output is the graph's.
    let output = if model.is_whole() {
        "logits"
    } else {
        "features"
    };
    if let Some(last) = b.nodes.last_mut() {
        last.output = vec![output.into()];
    }
    let mut dims = vec![None];
    dims.extend(model.output_shape(input).into_iter().map(Some));
    let mut props: Vec<(String, String)> = meta.to_metadata().into_iter().collect();
    props.push(("folded_bn".into(), folded.to_string()));
    props.sort();
    let graph = GraphProto {
        node: b.nodes,
        name: Some(meta.spec().model_name()),
        initializer: b.inits,
        doc_string: None,
        input: vec![value_info(
            "input",
            &[None, Some(3), Some(input), Some(input)],
        )],
        output: vec![value_info(output, &dims)],
    };
    let model = ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("vggctl".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!(
            "{} ({} head, {} classes)",
            meta.spec().model_name(),
            meta.head.name(),
            meta.classes
        )),
        graph: Some(graph),
        metadata_props: props
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k),
                value: Some(v),
            })
            .collect(),
    };
    Ok(model.encode_to_vec())
}
