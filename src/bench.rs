//! Kernel benchmarks on GPT-2 small shapes, shared by `shadertune bench kernels` and `cargo bench`.

use crate::gpu::{median, Dispatch, Gpu, GpuError, TimingSource};
use crate::kernels::{adamw, attention, crossentropy, embedding, gelu, layernorm, matmul, nf4, norm, residual};
use rand::{Rng, SeedableRng};

/// Shapes to benchmark: batch B sequences of T tokens through a GPT-2 of width C.
#[derive(Clone, Copy, Debug)]
pub struct BenchShapes {
    /// B.
    pub batch: usize,
    /// T.
    pub seq_len: usize,
    /// C.
    pub channels: usize,
    /// NH.
    pub num_heads: usize,
    /// V.
    pub vocab: usize,
}

impl BenchShapes {
    /// GPT-2 small with a batch of 8 x 120 tokens.
    pub fn gpt2_small() -> Self {
        BenchShapes { batch: 8, seq_len: 120, channels: 768, num_heads: 12, vocab: 50257 }
    }

    /// Small shapes for CI smoke runs.
    pub fn tiny() -> Self {
        BenchShapes { batch: 2, seq_len: 16, channels: 64, num_heads: 4, vocab: 1000 }
    }
}

/// One benchmark result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelTiming {
    /// `family::entry` (with a note where one family is timed at several shapes).
    pub kernel: String,
    /// Shape in the shape legend, e.g. `(960, 768) x (768, 3072)`.
    pub shape: String,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Achieved GFLOP/s, for compute-bound kernels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// Achieved GB/s of memory traffic, for memory-bound kernels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// Source of the time.
    pub timing: TimingSource,
}

struct Case {
    kernel: String,
    shape: String,
    /// Floating-point operations per call, counting a multiply-add as two.
    flops: Option<u64>,
    /// Bytes read plus bytes written per call.
    bytes: u64,
    dispatches: Vec<Dispatch>,
    // The buffers the dispatches bind; kept alive until the case is timed.
    _buffers: Vec<wgpu::Buffer>,
}

struct Maker<'g> {
    gpu: &'g Gpu,
    rng: rand_chacha::ChaCha8Rng,
}

impl Maker<'_> {
    fn random(&mut self, label: &str, len: usize, scale: f32) -> Result<wgpu::Buffer, GpuError> {
        let data: Vec<f32> = (0..len).map(|_| self.rng.random_range(-scale..scale)).collect();
        self.gpu.upload(label, &data)
    }

    fn zeros(&mut self, label: &str, len: usize) -> Result<wgpu::Buffer, GpuError> {
        self.gpu.storage_buffer(label, (len * 4) as u64)
    }
}

fn matmul_cases(m: &mut Maker<'_>, rows: usize, inner: usize, cols: usize, name: &str) -> Result<Vec<Case>, GpuError> {
    let gpu = m.gpu;
    let inp = m.random("inp", rows * inner, 1.0)?;
    let weight = m.random("weight", inner * cols, 0.05)?;
    let bias = m.random("bias", cols, 0.05)?;
    let out = m.zeros("out", rows * cols)?;
    let dinp = m.zeros("dinp", rows * inner)?;
    let dweight = m.zeros("dweight", inner * cols)?;
    let shape = matmul::MatmulShape::new(rows, inner, cols, matmul::WeightLayout::InOut);
    let flops = Some(2 * (rows * inner * cols) as u64);
    let bytes = 4 * (rows * inner + inner * cols + rows * cols) as u64;
    let text = format!("({rows}, {inner}) x ({inner}, {cols}) {name}");
    let fwd = matmul::forward(gpu, "bench matmul", shape, (&inp).into(), (&weight).into(), Some((&bias).into()), (&out).into())?;
    let bin = matmul::backward_input(gpu, "bench matmul dinp", shape, (&out).into(), (&weight).into(), (&dinp).into(), false)?;
    let bw = matmul::backward_weight(gpu, "bench matmul dweight", shape, (&inp).into(), (&out).into(), (&dweight).into())?;
    Ok(vec![
        Case { kernel: "matmul::matmul_forward".into(), shape: text.clone(), flops, bytes, dispatches: vec![fwd], _buffers: vec![] },
        Case { kernel: "matmul::matmul_backward_input".into(), shape: text.clone(), flops, bytes, dispatches: vec![bin], _buffers: vec![] },
        Case {
            kernel: "matmul::matmul_backward_weight".into(),
            shape: text,
            flops,
            bytes,
            dispatches: vec![bw],
            _buffers: vec![inp, weight, bias, out, dinp, dweight],
        },
    ])
}

/// Creates the cases of the NF4 products of a frozen weight, with f32 and with double-quantised
/// block scales, at the same shape as [`matmul_cases`] so that the rates compare within one run.
fn nf4_cases(m: &mut Maker<'_>, rows: usize, inner: usize, cols: usize, name: &str) -> Result<Vec<Case>, GpuError> {
    let gpu = m.gpu;
    let values: Vec<f32> = (0..inner * cols).map(|_| m.rng.random_range(-0.05f32..0.05)).collect();
    let mut matrices = Vec::new();
    for double_quant in [false, true] {
        match nf4::quantize(&values, inner, cols, double_quant) {
            Ok(matrix) => matrices.push(matrix),
            Err(e) => {
                log::warn!("skipping the NF4 benchmark of {name}: {e}");
                return Ok(Vec::new());
            }
        }
    }
    let inp = m.random("inp", rows * inner, 1.0)?;
    let bias = m.random("bias", cols, 0.05)?;
    let dout = m.random("dout", rows * cols, 1.0)?;
    let out = m.zeros("out", rows * cols)?;
    let dinp = m.zeros("dinp", rows * inner)?;
    let shape = matmul::MatmulShape::new(rows, inner, cols, matmul::WeightLayout::InOut);
    let flops = Some(2 * (rows * inner * cols) as u64);
    let text = format!("({rows}, {inner}) x ({inner}, {cols}) {name}");
    let mut cases = Vec::new();
    for (matrix, note) in matrices.iter().zip(["", " (double-quantised scales)"]) {
        let weight = matrix.upload(gpu, "bench nf4 weight")?;
        // Activations read and written as f32, the weight as its packed codes and scales.
        let bytes = 4 * (rows * inner + rows * cols) as u64 + matrix.device_bytes();
        let case = |kernel: String, dispatch: Dispatch| Case { kernel, shape: text.clone(), flops, bytes, dispatches: vec![dispatch], _buffers: vec![] };
        for (kernels, module, forward_entry, input_entry) in [
            (matmul::Kernels::Blocked, "matmul_nf4", "matmul_nf4_forward", "matmul_nf4_backward_input"),
            (matmul::Kernels::Any, "matmul_nf4_subgroup", "matmul_nn", "matmul_nt"),
        ] {
            let fwd = nf4::forward_with(gpu, "bench nf4", kernels, shape, (&inp).into(), weight.weight(), Some((&bias).into()), (&out).into())?;
            let bin = nf4::backward_input_with(gpu, "bench nf4 dinp", kernels, shape, (&dout).into(), weight.weight(), (&dinp).into(), false)?;
            // `Any` times each subgroup product only where the launchers choose it; these shapes
            // are aligned for its vec4 loads.
            let chosen = |input_grad: bool| -> Result<bool, GpuError> {
                Ok(kernels == matmul::Kernels::Blocked || matmul::subgroup_products_chosen(gpu, input_grad)?)
            };
            if chosen(false)? {
                cases.push(case(format!("{module}::{forward_entry}{note}"), fwd));
            }
            if chosen(true)? {
                cases.push(case(format!("{module}::{input_entry}{note}"), bin));
            }
        }
        cases.last_mut().expect("a case was just pushed")._buffers.extend([weight.packed, weight.scales]);
        // The step buffer of the double-quantised scales, when there is one, stays alive too.
        if let Some(steps) = weight.scale_steps {
            cases.last_mut().expect("a case was just pushed")._buffers.push(steps);
        }
    }
    cases.last_mut().expect("nf4_cases pushes four cases at least")._buffers.extend([inp, bias, dout, out, dinp]);
    Ok(cases)
}

/// Creates the cases of the products of a frozen weight stored in f16, at the same shape as
/// [`matmul_cases`] so that the rates compare within one run.
fn f16_cases(m: &mut Maker<'_>, rows: usize, inner: usize, cols: usize, name: &str) -> Result<Vec<Case>, GpuError> {
    use crate::kernels::f16_weights;
    let gpu = m.gpu;
    let values: Vec<f32> = (0..inner * cols).map(|_| m.rng.random_range(-0.05f32..0.05)).collect();
    let packed = match f16_weights::pack(&values, inner, cols) {
        Ok(packed) => packed,
        Err(e) => {
            log::warn!("skipping the f16 benchmark of {name}: {e}");
            return Ok(Vec::new());
        }
    };

    let weight = gpu.upload("bench f16 weight", &packed)?;
    let inp = m.random("inp", rows * inner, 1.0)?;
    let bias = m.random("bias", cols, 0.05)?;
    let dout = m.random("dout", rows * cols, 1.0)?;
    let out = m.zeros("out", rows * cols)?;
    let dinp = m.zeros("dinp", rows * inner)?;

    let shape = matmul::MatmulShape::new(rows, inner, cols, matmul::WeightLayout::InOut);
    let flops = Some(2 * (rows * inner * cols) as u64);
    // Activations read and written as f32, the weight as 2 bytes per value.
    let bytes = 4 * (rows * inner + rows * cols) as u64 + 2 * (inner * cols) as u64;
    let text = format!("({rows}, {inner}) x ({inner}, {cols}) {name}");
    let bound = f16_weights::F16Weight { rows: inner, cols, packed: (&weight).into() };
    let blocked = matmul::Kernels::Blocked;
    let fwd = f16_weights::forward_with(gpu, "bench f16", blocked, shape, (&inp).into(), bound, Some((&bias).into()), (&out).into())?;
    let bin = f16_weights::backward_input_with(gpu, "bench f16 dinp", blocked, shape, (&dout).into(), bound, (&dinp).into(), false)?;
    let case = |kernel: &str, dispatch: Dispatch| Case { kernel: kernel.into(), shape: text.clone(), flops, bytes, dispatches: vec![dispatch], _buffers: vec![] };
    let mut cases = vec![case("matmul_f16::matmul_f16_forward", fwd), case("matmul_f16::matmul_f16_backward_input", bin)];
    // The subgroup products with f16 loads, where the launchers would choose them.
    let encoded = matmul::EncodedWeight::F16 { packed: (&weight).into() };
    let subgroup_fwd = matmul::encoded_subgroup(gpu, "bench f16 subgroup", shape, false, (&inp).into(), encoded, Some((&bias).into()), (&out).into(), false)?;
    let subgroup_bin = matmul::encoded_subgroup(gpu, "bench f16 subgroup dinp", shape, true, (&dout).into(), encoded, None, (&dinp).into(), false)?;
    if let (Some(fwd), Some(bin)) = (subgroup_fwd, subgroup_bin) {
        cases.push(case("matmul_f16_subgroup::matmul_nn", fwd));
        cases.push(case("matmul_f16_subgroup::matmul_nt", bin));
    }
    // The last case keeps the buffers alive until the cases have run.
    cases.last_mut().expect("two cases at least")._buffers = vec![weight, inp, bias, dout, out, dinp];
    Ok(cases)
}

fn cases(gpu: &Gpu, s: BenchShapes) -> Result<Vec<Case>, GpuError> {
    let mut m = Maker { gpu, rng: rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed) };
    let (b, t, c, nh, v) = (s.batch, s.seq_len, s.channels, s.num_heads, s.vocab);
    let rows = b * t;
    let mut out = Vec::new();
    out.extend(matmul_cases(&mut m, rows, c, 3 * c, "attn.c_attn")?);
    out.extend(matmul_cases(&mut m, rows, c, 4 * c, "mlp.c_fc")?);
    out.extend(matmul_cases(&mut m, rows, 4 * c, c, "mlp.c_proj")?);
    out.extend(nf4_cases(&mut m, rows, c, 4 * c, "mlp.c_fc")?);
    if gpu.half_floats() {
        out.extend(f16_cases(&mut m, rows, c, 4 * c, "mlp.c_fc")?);
    }

    // Layer norm: reads x, writes y, plus small weight/stat vectors.
    let x = m.random("x", rows * c, 1.0)?;
    let w = m.random("ln w", c, 1.0)?;
    let bias = m.random("ln b", c, 1.0)?;
    let y = m.zeros("y", rows * c)?;
    let mean = m.zeros("mean", rows)?;
    let rstd = m.zeros("rstd", rows)?;
    let dx = m.zeros("dx", rows * c)?;
    let dw = m.zeros("dw", c)?;
    let db = m.zeros("db", c)?;
    let shape = format!("({rows}, {c})");
    let io = 4 * (2 * rows * c) as u64;
    out.push(Case {
        kernel: "layernorm::layernorm_forward".into(),
        shape: shape.clone(),
        flops: None,
        bytes: io,
        dispatches: vec![layernorm::forward(gpu, "bench ln", rows, c, 1e-5, (&x).into(), (&w).into(), (&bias).into(), (&y).into(), (&mean).into(), (&rstd).into())?],
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "layernorm::layernorm_backward_input".into(),
        shape: shape.clone(),
        flops: None,
        bytes: 4 * (3 * rows * c) as u64,
        dispatches: vec![layernorm::backward_input(
            gpu,
            "bench ln dx",
            rows,
            c,
            (&y).into(),
            (&x).into(),
            (&w).into(),
            (&mean).into(),
            (&rstd).into(),
            (&dx).into(),
            false,
        )?],
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "layernorm::layernorm_backward_params".into(),
        shape: shape.clone(),
        flops: None,
        bytes: io,
        dispatches: vec![layernorm::backward_params(gpu, "bench ln dw", rows, c, (&y).into(), (&x).into(), (&mean).into(), (&rstd).into(), (&dw).into(), (&db).into())?],
        _buffers: vec![x, w, bias, y, mean, rstd, dx, dw, db],
    });

    // GELU and residual over the MLP and residual-stream sizes.
    let n = rows * 4 * c;
    let g_in = m.random("gelu in", n, 2.0)?;
    let g_out = m.zeros("gelu out", n)?;
    let g_din = m.zeros("gelu din", n)?;
    out.push(Case {
        kernel: "gelu::gelu_forward".into(),
        shape: format!("({rows}, {})", 4 * c),
        flops: None,
        bytes: 4 * 2 * n as u64,
        dispatches: vec![gelu::forward(gpu, "bench gelu", n, (&g_in).into(), (&g_out).into())?],
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "gelu::gelu_backward".into(),
        shape: format!("({rows}, {})", 4 * c),
        flops: None,
        bytes: 4 * 3 * n as u64,
        dispatches: vec![gelu::backward(gpu, "bench gelu bwd", n, (&g_in).into(), (&g_out).into(), (&g_din).into(), false)?],
        _buffers: vec![g_in, g_out, g_din],
    });
    let n = rows * c;
    let a = m.random("a", n, 1.0)?;
    let bb = m.random("b", n, 1.0)?;
    let sum = m.zeros("sum", n)?;
    out.push(Case {
        kernel: "residual::residual_forward".into(),
        shape: format!("({rows}, {c})"),
        flops: None,
        bytes: 4 * 3 * n as u64,
        dispatches: vec![residual::forward(gpu, "bench residual", n, 1.0, (&a).into(), (&bb).into(), (&sum).into())?],
        _buffers: vec![a, bb, sum],
    });

    // Attention: QK^T and att @ V products dominate, each B*NH*T*T*HS multiply-adds, counted
    // over the causal half (the batched products compute the whole square).
    let shape = attention::AttentionShape { batch: b, seq_len: t, channels: c, num_heads: nh };
    let qkv = m.random("qkv", rows * 3 * c, 1.0)?;
    let att = m.zeros("att", shape.att_floats())?;
    let datt = m.zeros("datt", shape.att_floats())?;
    let a_out = m.zeros("attn out", rows * c)?;
    let dqkv = m.zeros("dqkv", rows * 3 * c)?;
    let att_flops = 2 * 2 * (b * t * t * c) as u64 / 2;
    let text = format!("B={b} T={t} C={c} NH={nh}");
    out.push(Case {
        kernel: "attention forward".into(),
        shape: text.clone(),
        flops: Some(att_flops),
        bytes: 4 * (rows * 4 * c + shape.att_floats()) as u64,
        dispatches: attention::forward(gpu, "bench attention", shape, (&qkv).into(), (&att).into(), (&a_out).into())?,
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "attention backward".into(),
        shape: text,
        flops: Some(2 * att_flops),
        bytes: 4 * (rows * 7 * c + 2 * shape.att_floats()) as u64,
        dispatches: attention::backward(gpu, "bench attention bwd", shape, (&a_out).into(), (&qkv).into(), (&att).into(), (&datt).into(), (&dqkv).into(), false)?,
        _buffers: vec![qkv, att, datt, a_out, dqkv],
    });

    // Embedding with the token table split into two chunks, as the engine does for GPT-2 small
    // under a 128 MiB binding limit.
    let ids: Vec<u32> = (0..rows).map(|_| m.rng.random_range(0..v as u32)).collect();
    let ids_buffer = gpu.upload("ids", &ids)?;
    let half = v / 2;
    let wte_a = m.random("wte a", half * c, 0.02)?;
    let wte_b = m.random("wte b", (v - half) * c, 0.02)?;
    let wpe = m.random("wpe", t * c, 0.02)?;
    let emb = m.zeros("emb", rows * c)?;
    let segments = embedding::token_segments(&ids);
    let order = gpu.upload("order", &segments.order)?;
    let segs = gpu.upload("segments", &segments.segments)?;
    let dwte_a = m.zeros("dwte a", half * c)?;
    out.push(Case {
        kernel: "embedding::embedding_forward (2 chunks)".into(),
        shape: format!("({rows}) ids, ({v}, {c}) wte"),
        flops: None,
        bytes: 4 * (3 * rows * c) as u64,
        dispatches: vec![
            embedding::forward(gpu, "bench emb a", b, t, c, (&ids_buffer).into(), (&wte_a).into(), 0, half, (&wpe).into(), (&emb).into())?,
            embedding::forward(gpu, "bench emb b", b, t, c, (&ids_buffer).into(), (&wte_b).into(), half, v - half, (&wpe).into(), (&emb).into())?,
        ],
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "embedding::embedding_backward_token".into(),
        shape: format!("({rows}) ids, ({half}, {c}) chunk"),
        flops: None,
        bytes: 4 * (2 * rows * c) as u64,
        dispatches: vec![embedding::backward_token(
            gpu,
            "bench emb bwd",
            b,
            t,
            c,
            (&order).into(),
            (&segs).into(),
            (&emb).into(),
            (&dwte_a).into(),
            0,
            half,
        )?],
        _buffers: vec![ids_buffer, wte_a, wte_b, wpe, emb, order, segs, dwte_a],
    });

    // Cross-entropy over the vocabulary for one sequence of T rows (the engine chunks larger
    // logits), and AdamW plus the norm reduction over the c_fc weight.
    let xrows = t;
    let logits = m.random("logits", xrows * v, 3.0)?;
    let targets: Vec<i32> = (0..xrows).map(|_| m.rng.random_range(0..v as i32)).collect();
    let targets = gpu.upload("targets", &targets)?;
    let losses = m.zeros("losses", xrows)?;
    let loss = m.zeros("loss", 2)?;
    let dlogits = m.zeros("dlogits", xrows * v)?;
    out.push(Case {
        kernel: "crossentropy::crossentropy_forward".into(),
        shape: format!("({xrows}, {v})"),
        flops: None,
        bytes: 4 * (xrows * v) as u64,
        dispatches: vec![crossentropy::forward(gpu, "bench xent", xrows, v, (&logits).into(), (&targets).into(), (&losses).into())?],
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "crossentropy::crossentropy_backward".into(),
        shape: format!("({xrows}, {v})"),
        flops: None,
        bytes: 4 * (2 * xrows * v) as u64,
        dispatches: vec![crossentropy::backward(gpu, "bench xent bwd", xrows, v, (&logits).into(), (&targets).into(), (&loss).into(), (&dlogits).into())?],
        _buffers: vec![logits, targets, losses, loss, dlogits],
    });
    let n = c * 4 * c;
    let param = m.random("param", n, 0.02)?;
    let grad = m.random("grad", n, 0.01)?;
    let mm = m.zeros("m", n)?;
    let vv = m.zeros("v", n)?;
    let step = adamw::AdamWStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        bias_correction1: 0.1,
        bias_correction2: 0.001,
        max_norm: 0.0,
        grad_scale: 1.0,
        steps: 0,
        _pad: [0; 3],
    };
    let step = gpu.upload("step", bytemuck::bytes_of(&step))?;
    let gnorm = m.zeros("norm", 1)?;
    let partials = m.zeros("partials", norm::partials_len(n))?;
    out.push(Case {
        kernel: "adamw::adamw_update".into(),
        shape: format!("({c}, {})", 4 * c),
        flops: None,
        // Reads param, grad, m, v; writes param, grad (zeroed), m, v.
        bytes: 4 * 8 * n as u64,
        dispatches: vec![adamw::update(gpu, "bench adamw", n, 0.1, (&step).into(), (&gnorm).into(), adamw::AdamWState { param: (&param).into(), grad: (&grad).into(), m: (&mm).into(), v: (&vv).into() })?],
        _buffers: vec![],
    });
    out.push(Case {
        kernel: "norm::norm_partial_sums".into(),
        shape: format!("({c}, {})", 4 * c),
        flops: None,
        bytes: 4 * n as u64,
        dispatches: vec![norm::partial_sums(gpu, "bench norm", n, (&grad).into(), (&partials).into(), 0)?],
        _buffers: vec![param, grad, mm, vv, step, gnorm, partials],
    });
    Ok(out)
}

/// Returns the matmul variant each product form uses on `gpu` (autotuned where the device has autotuning
/// on and more than one variant fits), as `nn subgroup, nt subgroup, tn subgroup`.
pub fn matmul_variants(gpu: &Gpu) -> Result<String, GpuError> {
    let chosen = matmul::chosen_variants(gpu)?;
    Ok(chosen.iter().map(|(form, variant)| format!("{form} {variant}")).collect::<Vec<_>>().join(", "))
}

/// Times every kernel family at `shapes`: `warmup` untimed runs, then the median of `repeats`.
pub fn bench_kernels(gpu: &Gpu, shapes: BenchShapes, warmup: usize, repeats: usize) -> Result<Vec<KernelTiming>, GpuError> {
    let timing = gpu.timing_source();
    if timing == TimingSource::WallClock {
        log::warn!("the adapter has no timestamp queries; timing with the wall clock around a blocking poll");
    }
    let mut results = Vec::new();
    for case in cases(gpu, shapes)? {
        let times = gpu.time_dispatches(&case.kernel, &case.dispatches, warmup, repeats)?;
        let ms = median(&times);
        let seconds = ms / 1e3;
        results.push(KernelTiming {
            kernel: case.kernel,
            shape: case.shape,
            ms,
            gflops: case.flops.map(|f| f as f64 / seconds / 1e9),
            gbps: if case.flops.is_none() { Some(case.bytes as f64 / seconds / 1e9) } else { None },
            timing,
        });
    }
    Ok(results)
}

/// One training-step benchmark result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepTiming {
    /// Median milliseconds per step (forward, backward, optimizer, loss read-back).
    pub ms_per_step: f64,
    /// Tokens processed per second (B * T / step time).
    pub tokens_per_s: f64,
    /// Achieved GFLOP/s of the step's forward and backward FLOPs.
    pub gflops: f64,
    /// Best matmul rate measured in the same run, GFLOP/s, on the step's MLP product.
    pub matmul_peak_gflops: f64,
    /// `gflops / matmul_peak_gflops`.
    pub ratio_to_matmul_peak: f64,
    /// Forward plus backward FLOPs per step.
    pub flops_per_step: u64,
    /// Storage of the frozen linear weights.
    pub precision: crate::model::gpt2::Precision,
    /// Trainable parameters of the step.
    pub trainable_params: u64,
    /// Peak device memory of the plan, bytes.
    pub peak_bytes: u64,
    /// GPU milliseconds per kernel kind in one profiled step, largest first (empty without
    /// timestamp queries).
    pub profile: Vec<(String, f64)>,
}

/// Groups dispatch labels by kernel kind: the label up to the first tensor name.
fn kernel_kind(label: &str) -> String {
    let words: Vec<&str> = label.split_whitespace().collect();
    let kind: Vec<&str> = words.iter().take_while(|w| !w.contains('.') && !w.contains('[')).copied().collect();
    if kind.is_empty() {
        label.to_string()
    } else {
        kind.join(" ")
    }
}

/// Times training steps of a classifier (or language model) of `config` with random weights and
/// random token ids: `warmup` untimed steps, then the median of `repeats`.
pub fn bench_step(
    gpu: &Gpu,
    config: &crate::model::config::Gpt2Config,
    head: crate::model::gpt2::Head,
    shape: crate::model::gpt2::BatchShape,
    trainable: crate::model::gpt2::Trainable,
    lora: Option<&crate::model::lora::LoraSpec>,
    precision: crate::model::gpt2::Precision,
    warmup: usize,
    repeats: usize,
) -> Result<StepTiming, crate::train::classifier::TrainError> {
    use crate::graph::executor::{OptimizerSettings, StepInputs};
    use crate::model::gpt2::{build_graph_with, Head};
    use crate::model::weights::{init_random, HeadKind};

    let head_kind = match head {
        Head::LanguageModel | Head::LanguageModelLoss => HeadKind::LanguageModel,
        Head::Classifier { num_labels } => HeadKind::Classifier { num_labels },
    };
    let mut weights = init_random(config, head_kind, 0)
        .map_err(|e| crate::train::classifier::TrainError::Invalid(e.to_string()))?;
    if let Some(spec) = lora {
        let modules = spec.modules(config)?;
        for (name, tensor) in crate::model::lora::init_adapter(spec, &modules, 0).tensors {
            weights.insert(name, tensor);
        }
    }
    if precision == crate::model::gpt2::Precision::F16 {
        crate::model::gpt2::check_f16(config).map_err(crate::train::classifier::TrainError::Invalid)?;
        crate::model::gpt2::check_f16_adapter(gpu).map_err(crate::train::classifier::TrainError::Invalid)?;
    }
    let graph = build_graph_with(config, head, shape, trainable, lora, precision, gpu.limits().max_storage_buffer_binding_size);
    let mut session = crate::graph::Session::new(gpu, graph, &weights, true, OptimizerSettings::default())?;
    let summary = session.summary();

    let (b, t) = (shape.batch, shape.seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let vocab = config.vocab_size as u32;
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(0..vocab)).collect();
    let lengths = vec![t as u32; b];
    let targets: Vec<i32> = match head {
        Head::Classifier { num_labels } => (0..b).map(|_| rng.random_range(0..num_labels as i32)).collect(),
        Head::LanguageModel | Head::LanguageModelLoss => (0..b * t).map(|_| rng.random_range(0..vocab as i32)).collect(),
    };
    session.set_inputs(&StepInputs { ids: &ids, lengths: &lengths, targets: &targets });
    // A learning rate of zero keeps the random weights, and so the work per step, unchanged.
    for _ in 0..warmup {
        session.submit(true, Some(0.0), 1.0)?;
        session.read_loss()?;
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let start = std::time::Instant::now();
        session.submit(true, Some(0.0), 1.0)?;
        session.read_loss()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let ms = median(&times);
    let mut by_kind: Vec<(String, f64)> = Vec::new();
    if let Some(profile) = session.profile(true)? {
        for (label, ms) in profile {
            let kind = kernel_kind(&label);
            match by_kind.iter_mut().find(|(k, _)| *k == kind) {
                Some(entry) => entry.1 += ms,
                None => by_kind.push((kind, ms)),
            }
        }
        by_kind.sort_by(|a, b| b.1.total_cmp(&a.1));
    }

    // The best matmul rate of this run, on the step's largest product (the MLP up-projection).
    let rows = b * t;
    let inner = config.n_embd;
    let cols = config.inner_dim();
    let mut maker = Maker { gpu, rng: rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed) };
    let mut peak: f64 = 0.0;
    for case in matmul_cases(&mut maker, rows, inner, cols, "mlp.c_fc")? {
        let case_ms = median(&gpu.time_dispatches(&case.kernel, &case.dispatches, 1, 5)?);
        if let Some(flops) = case.flops {
            peak = peak.max(flops as f64 / (case_ms / 1e3) / 1e9);
        }
    }
    let flops = summary.forward_flops + summary.backward_flops;
    let gflops = flops as f64 / (ms / 1e3) / 1e9;
    Ok(StepTiming {
        ms_per_step: ms,
        tokens_per_s: (b * t) as f64 / (ms / 1e3),
        gflops,
        matmul_peak_gflops: peak,
        ratio_to_matmul_peak: gflops / peak,
        flops_per_step: flops,
        precision,
        trainable_params: summary.trainable_params,
        peak_bytes: summary.peak_bytes,
        profile: by_kind,
    })
}
