//! Reverse-mode autodiff over the forward ops, pruned to what trainable parameters need.
//!
//! A tensor needs a gradient when a trainable parameter lies upstream of it. Walking the ops
//! backwards from the loss, each op emits backward kernels only for inputs that need a gradient,
//! so frozen weights get no weight-gradient kernel and no gradient buffer, and no input-gradient
//! kernel runs below the lowest trainable parameter.

use super::ir::{chunk_shape, DType, Graph, Op, RowChunk, TensorId, TensorKind};
use super::plan::Kernel;
use crate::kernels::matmul::{MatmulShape, WeightLayout};
use std::collections::{HashMap, HashSet};

/// The backward pass of a graph.
#[derive(Clone, Debug, Default)]
pub(crate) struct Backward {
    pub kernels: Vec<Kernel>,
    /// (parameter, gradient) for every trainable parameter tensor, in graph order.
    pub param_grads: Vec<(TensorId, TensorId)>,
}

struct Grads<'g> {
    graph: &'g mut Graph,
    grad_of: HashMap<TensorId, TensorId>,
    /// Activation gradients that already have a producer, so later producers accumulate.
    written: HashSet<TensorId>,
}

impl Grads<'_> {
    fn grad(&mut self, t: TensorId) -> TensorId {
        if let Some(&g) = self.grad_of.get(&t) {
            return g;
        }
        let tensor = &self.graph.tensors[t];
        let kind = match tensor.kind {
            TensorKind::Param { .. } => TensorKind::ParamGrad,
            _ => TensorKind::ActivationGrad,
        };
        let (name, shape) = (format!("{}.grad", tensor.name), tensor.shape.clone());
        let g = self.graph.tensor(name, &shape, DType::F32, kind);
        self.grad_of.insert(t, g);
        g
    }

    /// Returns the gradient buffer of `t` and whether the next write must accumulate. Parameter
    /// gradients always accumulate (the optimizer zeroes them); activation gradients are
    /// assigned by their first producer.
    fn target(&mut self, t: TensorId) -> (TensorId, bool) {
        let g = self.grad(t);
        let accumulate = matches!(self.graph.tensors[t].kind, TensorKind::Param { .. }) || !self.written.insert(t);
        (g, accumulate)
    }

    fn has_grad(&self, t: TensorId) -> bool {
        self.written.contains(&t)
    }
}

/// Emits the backward kernels of `graph`, whose last op must be a cross-entropy loss.
pub(crate) fn differentiate(graph: &mut Graph) -> Backward {
    let needs = needs_grad(graph);
    let ops = graph.ops.clone();
    let mut kernels = Vec::new();
    let mut g = Grads { graph, grad_of: HashMap::new(), written: HashSet::new() };

    for op in ops.iter().rev() {
        match op {
            Op::CrossEntropy { rows, classes, logits, targets, loss, .. } => {
                if needs[*logits] {
                    let (dlogits, _) = g.target(*logits);
                    kernels.push(Kernel::XentBackward { rows: *rows, classes: *classes, logits: *logits, targets: *targets, loss: *loss, dlogits });
                }
            }
            Op::LmLoss { rows, channels, vocab, row_chunk, inp, wte, targets, logits, stats, losses, loss } => {
                let wte_trainable = wte.iter().any(|c| g.graph.is_trainable(c.tensor));
                if !needs[*inp] && !wte_trainable {
                    continue;
                }
                let dinp = needs[*inp].then(|| g.target(*inp));
                let dwte = wte.iter().map(|c| g.graph.is_trainable(c.tensor).then(|| g.target(c.tensor).0)).collect();
                kernels.push(Kernel::LmLossFused {
                    rows: *rows,
                    channels: *channels,
                    vocab: *vocab,
                    row_chunk: *row_chunk,
                    inp: *inp,
                    wte: wte.clone(),
                    targets: *targets,
                    logits: *logits,
                    stats: *stats,
                    losses: *losses,
                    loss: *loss,
                    dinp,
                    dwte,
                });
            }
            Op::PoolLast { batch, seq_len, channels, hidden, lengths, pooled } => {
                if needs[*hidden] && g.has_grad(*pooled) {
                    let dpooled = g.grad(*pooled);
                    let (dhidden, accumulate) = g.target(*hidden);
                    kernels.push(Kernel::PoolBackward {
                        batch: *batch,
                        seq_len: *seq_len,
                        channels: *channels,
                        dpooled,
                        lengths: *lengths,
                        dhidden,
                        accumulate,
                    });
                }
            }
            Op::Matmul { rows, inner, cols, layout, inp, weight, bias, out } => {
                if !g.has_grad(*out) {
                    continue;
                }
                let dout = g.grad(*out);
                let shape_of = |chunk: &RowChunk| chunk_shape(*rows, *inner, *cols, *layout, weight, chunk);
                for chunk in weight {
                    let shape = shape_of(chunk);
                    if g.graph.is_trainable(chunk.tensor) {
                        let (dweight, _) = g.target(chunk.tensor);
                        kernels.push(Kernel::MatmulWeight { shape, inp: *inp, dout, dweight });
                    }
                }
                if let Some(b) = bias {
                    if g.graph.is_trainable(*b) {
                        let (dbias, _) = g.target(*b);
                        let shape = MatmulShape::new(*rows, *inner, *cols, *layout);
                        kernels.push(Kernel::MatmulBias { shape, dout, dbias });
                    }
                }
                if needs[*inp] {
                    for chunk in weight {
                        let shape = shape_of(chunk);
                        let (dinp, accumulate) = g.target(*inp);
                        kernels.push(Kernel::MatmulInput { shape, dout, weight: chunk.tensor, dinp, accumulate });
                    }
                }
            }
            Op::MatmulNf4 { rows, inner, cols, inp, codes, scales, steps, bias, out } => {
                assert!(bias.is_none_or(|b| !g.graph.is_trainable(b)), "an NF4 layer is frozen, its bias too");
                if needs[*inp] && g.has_grad(*out) {
                    let dout = g.grad(*out);
                    let (dinp, accumulate) = g.target(*inp);
                    let shape = MatmulShape::new(*rows, *inner, *cols, WeightLayout::InOut);
                    kernels.push(Kernel::MatmulNf4Input { shape, dout, codes: *codes, scales: *scales, steps: *steps, dinp, accumulate });
                }
            }
            Op::MatmulF16 { rows, inner, cols, inp, packed, bias, out } => {
                assert!(bias.is_none_or(|b| !g.graph.is_trainable(b)), "an f16 layer is frozen, its bias too");
                if needs[*inp] && g.has_grad(*out) {
                    let dout = g.grad(*out);
                    let (dinp, accumulate) = g.target(*inp);
                    let shape = MatmulShape::new(*rows, *inner, *cols, WeightLayout::InOut);
                    kernels.push(Kernel::MatmulF16Input { shape, dout, packed: *packed, dinp, accumulate });
                }
            }
            Op::Gelu { len, inp, out } => {
                if needs[*inp] && g.has_grad(*out) {
                    let dout = g.grad(*out);
                    let (dinp, accumulate) = g.target(*inp);
                    kernels.push(Kernel::GeluBackward { len: *len, inp: *inp, dout, dinp, accumulate });
                }
            }
            Op::Add { len, a, b, scale, out } => {
                if !g.has_grad(*out) {
                    continue;
                }
                let dout = g.grad(*out);
                // out = a + s * b: da = dout, db = s * dout.
                for (x, s) in [(a, 1.0), (b, *scale)] {
                    if needs[*x] {
                        let (dx, accumulate) = g.target(*x);
                        kernels.push(Kernel::Copy { len: *len, src: dout, dst: dx, scale: s, accumulate });
                    }
                }
            }
            Op::Dropout { len, prob, seed, salt, inp, out } => {
                if needs[*inp] && g.has_grad(*out) {
                    let dout = g.grad(*out);
                    let (dinp, accumulate) = g.target(*inp);
                    kernels.push(Kernel::DropoutBackward { len: *len, prob: *prob, seed: *seed, salt: *salt, dout, dinp, accumulate });
                }
            }
            Op::Attention { shape, qkv, att, out } => {
                if needs[*qkv] && g.has_grad(*out) {
                    let dout = g.grad(*out);
                    let name = format!("{}.scratch", g.graph.tensors[*att].name);
                    let att_shape = g.graph.tensors[*att].shape.clone();
                    let datt = g.graph.tensor(name, &att_shape, DType::F32, TensorKind::Scratch);
                    let (dqkv, accumulate) = g.target(*qkv);
                    kernels.push(Kernel::AttentionBackward { shape: *shape, dout, qkv: *qkv, att: *att, datt, dqkv, accumulate });
                }
            }
            Op::LayerNorm { rows, channels, inp, weight, bias, out, mean, rstd, .. } => {
                if !g.has_grad(*out) {
                    continue;
                }
                let dout = g.grad(*out);
                let weight_trainable = g.graph.is_trainable(*weight);
                assert_eq!(
                    weight_trainable,
                    g.graph.is_trainable(*bias),
                    "a layer norm's weight and bias are trained together"
                );
                if weight_trainable {
                    let (dweight, _) = g.target(*weight);
                    let (dbias, _) = g.target(*bias);
                    kernels.push(Kernel::LayerNormParams {
                        rows: *rows,
                        channels: *channels,
                        dout,
                        inp: *inp,
                        mean: *mean,
                        rstd: *rstd,
                        dweight,
                        dbias,
                    });
                }
                if needs[*inp] {
                    let (dinp, accumulate) = g.target(*inp);
                    kernels.push(Kernel::LayerNormInput {
                        rows: *rows,
                        channels: *channels,
                        dout,
                        inp: *inp,
                        weight: *weight,
                        mean: *mean,
                        rstd: *rstd,
                        dinp,
                        accumulate,
                    });
                }
            }
            Op::Embedding { batch, seq_len, channels, ids: _, wte, wpe, out } => {
                if !g.has_grad(*out) {
                    continue;
                }
                let dout = g.grad(*out);
                let token_trainable = wte.iter().any(|c| g.graph.is_trainable(c.tensor));
                if token_trainable {
                    let positions = batch * seq_len;
                    let order = g.graph.tensor("token_order", &[positions], DType::U32, TensorKind::Input);
                    let segments = g.graph.tensor("token_segments", &[1 + 3 * positions], DType::U32, TensorKind::Input);
                    for chunk in wte {
                        let (dwte, _) = g.target(chunk.tensor);
                        kernels.push(Kernel::EmbeddingToken {
                            batch: *batch,
                            seq_len: *seq_len,
                            channels: *channels,
                            order,
                            segments,
                            dout,
                            dwte,
                            row_offset: chunk.row_offset,
                            rows: chunk.rows,
                        });
                    }
                }
                if g.graph.is_trainable(*wpe) {
                    let (dwpe, _) = g.target(*wpe);
                    kernels.push(Kernel::EmbeddingPosition { batch: *batch, seq_len: *seq_len, channels: *channels, dout, dwpe });
                }
            }
        }
    }

    let mut param_grads: Vec<(TensorId, TensorId)> = g
        .grad_of
        .iter()
        .filter(|(&t, _)| matches!(g.graph.tensors[t].kind, TensorKind::Param { .. }))
        .map(|(&t, &grad)| (t, grad))
        .collect();
    param_grads.sort();
    Backward { kernels, param_grads }
}

/// For every tensor, whether a trainable parameter lies upstream of it.
fn needs_grad(graph: &Graph) -> Vec<bool> {
    let mut needs: Vec<bool> = (0..graph.tensors.len()).map(|t| graph.is_trainable(t)).collect();
    for op in &graph.ops {
        let upstream = op.inputs().into_iter().any(|t| needs[t] && graph.tensors[t].dtype == DType::F32);
        if upstream {
            for t in op.outputs() {
                needs[t] = true;
            }
        }
    }
    needs
}
