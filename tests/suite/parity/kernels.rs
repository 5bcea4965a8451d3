//! Our fused ops against the plain Burn ops they replace: on wgpu these run our CubeCL
//! kernels (in f32 and f16), on the CPU the plain path (and the chunked attention).
//! The reference is always the plain composition computed on the CPU backend in f32.

use burn::tensor::{DType, Tensor, TensorData};
use hypergen::kernels::reference::{data, group_norm_f64};
use hypergen::kernels::{plain, KernelSet};
use hypergen::FusedOps;

use crate::common::{rel_error, values, Cpu, TOL_F32};

/// Relative error allowed when the fused op stores float16: the output is rounded once
/// to f16 (unit roundoff 2⁻¹¹ ≈ 4.9e-4) and the inputs were rounded too; 2e-3 is four
/// roundings, whatever the kernel.
const TOL_F16: f64 = 2e-3;

fn tensor<B: FusedOps, const D: usize>(
    v: &[f32],
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), (device, dtype))
}

fn cpu<const D: usize>(v: &[f32], shape: [usize; D]) -> Tensor<Cpu, D> {
    tensor::<Cpu, D>(v, shape, DType::F32, &Default::default())
}

fn check(what: &str, got: Vec<f32>, want: Vec<f32>, tol: f64) {
    let err = rel_error(&got, &want);
    println!("{what}: relative error {err:.2e} (limit {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// On wgpu the test must exercise our kernels, not a fallback chosen by the environment.
fn kernels_on<B: FusedOps>() {
    if std::any::type_name::<B>() != std::any::type_name::<Cpu>() {
        assert_eq!(
            KernelSet::current(),
            KernelSet::ALL,
            "HYPERGEN_KERNELS turns kernels off; unset it to run the kernel tests"
        );
    }
}

fn group_norm_case<B: FusedOps>(
    device: &B::Device,
    dtype: DType,
    [n, c, l]: [usize; 3],
    groups: usize,
    affine: bool,
    silu: bool,
    shift: f32,
) {
    let x = data(n * c * l, 0.3, 2.0, shift);
    let gamma = data(c, 1.7, 0.5, 1.0);
    let beta = data(c, 2.9, 0.3, 0.0);
    let want = plain::group_norm(
        cpu(&x, [n, c, l]),
        affine.then(|| (cpu(&gamma, [c]), cpu(&beta, [c]))),
        groups,
        1e-5,
        silu,
    );
    let got = B::fused_group_norm(
        tensor::<B, 3>(&x, [n, c, l], dtype, device),
        affine.then(|| {
            (
                tensor::<B, 1>(&gamma, [c], dtype, device),
                tensor::<B, 1>(&beta, [c], dtype, device),
            )
        }),
        groups,
        1e-5,
        silu,
    );
    assert_eq!(got.dims(), [n, c, l]);
    assert_eq!(got.dtype(), dtype, "output keeps the input dtype");
    let tol = if dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_F16
    };
    let what = format!(
        "group_norm {dtype:?} [{n},{c},{l}] g{groups} affine={affine} silu={silu} shift={shift}"
    );
    let exact = group_norm_f64(
        &x,
        [n, c, l],
        groups,
        affine.then_some((&gamma[..], &beta[..])),
        silu,
    );
    let got = values(got);
    check(&format!("{what} vs f64"), got.clone(), exact.clone(), tol);
    check(
        &format!("plain CPU {what} vs f64"),
        values(want),
        exact,
        tol,
    );
}

fn group_norm<B: FusedOps>(device: &B::Device) {
    kernels_on::<B>();
    // Small groups (one statistics chunk), with and without affine and SiLU.
    group_norm_case::<B>(device, DType::F32, [2, 32, 45], 8, true, true, 0.0);
    group_norm_case::<B>(device, DType::F32, [2, 32, 45], 8, false, false, 0.0);
    // Groups of 8·1100 = 8800 elements: two chunks merged, the second partial; a large
    // mean tests the centred statistics.
    group_norm_case::<B>(device, DType::F32, [1, 64, 1100], 8, true, false, 100.0);
    // A group of 4·5000 = 20000 elements (three chunks), as in the VAE's wide layers.
    group_norm_case::<B>(device, DType::F32, [2, 8, 5000], 2, true, true, -3.0);
    // Half-precision storage, f32 statistics.
    group_norm_case::<B>(device, DType::F16, [2, 64, 1100], 32, true, true, 0.5);
}
crate::on_backends!(fused_group_norm, group_norm);

fn geglu_case<B: FusedOps>(device: &B::Device, dtype: DType, [n, l, w]: [usize; 3]) {
    let x = data(n * l * w, 0.9, 3.0, 0.1);
    let want = plain::geglu(cpu(&x, [n, l, w]));
    let got = B::fused_geglu(tensor::<B, 3>(&x, [n, l, w], dtype, device));
    assert_eq!(got.dims(), [n, l, w / 2]);
    assert_eq!(got.dtype(), dtype);
    let tol = if dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_F16
    };
    check(
        &format!("geglu {dtype:?} [{n},{l},{w}]"),
        values(got),
        values(want),
        tol,
    );
}

fn geglu<B: FusedOps>(device: &B::Device) {
    kernels_on::<B>();
    geglu_case::<B>(device, DType::F32, [2, 77, 80]);
    geglu_case::<B>(device, DType::F32, [1, 300, 2 * 640]);
    geglu_case::<B>(device, DType::F16, [2, 64, 2 * 96]);
}
crate::on_backends!(fused_geglu, geglu);

/// Attention on `[N, L, H·D]` sequences split into heads, as the model calls it (the
/// heads are strided views, not contiguous copies).
fn attention_case<B: FusedOps>(
    device: &B::Device,
    dtype: DType,
    n: usize,
    heads: usize,
    l: usize,
    s: usize,
    d: usize,
) {
    let q = data(n * l * heads * d, 0.1, 1.5, 0.0);
    let k = data(n * s * heads * d, 0.4, 1.5, 0.2);
    let v = data(n * s * heads * d, 0.8, 1.0, -0.1);
    let split = |t: Tensor<Cpu, 3>| t.reshape([n, 0, heads, d]).swap_dims(1, 2);
    let want = plain::attention_full(
        split(cpu(&q, [n, l, heads * d])),
        split(cpu(&k, [n, s, heads * d])),
        split(cpu(&v, [n, s, heads * d])),
    );
    let split_b = |t: Tensor<B, 3>| t.reshape([n, 0, heads, d]).swap_dims(1, 2);
    let inputs = || {
        (
            split_b(tensor::<B, 3>(&q, [n, l, heads * d], dtype, device)),
            split_b(tensor::<B, 3>(&k, [n, s, heads * d], dtype, device)),
            split_b(tensor::<B, 3>(&v, [n, s, heads * d], dtype, device)),
        )
    };
    let tol = if dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_F16
    };
    let what = format!("attention {dtype:?} n{n} h{heads} l{l} s{s} d{d}");
    let want = values(want);

    // What the model calls: autotuned flash kernels on wgpu, chunked on the CPU.
    let (tq, tk, tv) = inputs();
    let got = B::fused_attention(tq, tk, tv);
    assert_eq!(got.dims(), [n, heads, l, d]);
    assert_eq!(got.dtype(), dtype);
    check(&what, values(got), want.clone(), tol);

    // Our flash kernel by itself, wherever it applies.
    let (tq, tk, tv) = inputs();
    let on_cpu = std::any::type_name::<B>() == std::any::type_name::<Cpu>();
    match B::flash_attention(tq, tk, tv) {
        Some(got) => {
            assert!(d <= hypergen::kernels::MAX_HEAD_DIM);
            check(&format!("hypergen flash {what}"), values(got), want, tol);
        }
        None => assert!(
            on_cpu || d > hypergen::kernels::MAX_HEAD_DIM,
            "our flash kernel must run on wgpu for head width {d}"
        ),
    }
}

fn attention<B: FusedOps>(device: &B::Device) {
    kernels_on::<B>();
    // Self-attention over several key tiles and a partial last tile, two query cubes.
    attention_case::<B>(device, DType::F32, 2, 2, 130, 130, 64);
    // Cross-attention to 77 text tokens, an odd head width.
    attention_case::<B>(device, DType::F32, 2, 3, 100, 77, 40);
    // The widest head the kernel takes (8 keys per tile), and the VAE's single
    // 512-wide head (too wide for it: autotuned Burn kernels or the chunked path).
    attention_case::<B>(device, DType::F32, 1, 1, 70, 70, 256);
    attention_case::<B>(device, DType::F32, 1, 1, 70, 70, 512);
    attention_case::<B>(device, DType::F32, 1, 1, 70, 70, 512);
    // Half-precision storage, f32 accumulation.
    attention_case::<B>(device, DType::F16, 2, 2, 96, 77, 64);
}
crate::on_backends!(fused_attention, attention);

/// A linear layer on `[N, 1, C]` rows made by fused ops (one position picked per sequence,
/// plus a residual), as CLIP's last layer at the pooled positions makes them: Burn 0.21's
/// `linear` (the weight broadcast over the batch) gave wrong rows past the first here on
/// wgpu; `fused_linear` multiplies all rows as one matrix.
fn linear_picked_rows<B: FusedOps>(device: &B::Device) {
    kernels_on::<B>();
    let (n, l, c, o) = (3, 20, 64, 128);
    let at = [5, 9, 13];
    let (xv, av) = (data(n * l * c, 0.3, 1.0, 0.0), data(n * c, 0.5, 1.0, 0.1));
    let (wv, bv) = (data(c * o, 0.7, 0.2, 0.0), data(o, 0.9, 0.5, 0.0));
    let picked = |x: Tensor<B, 3>, a: Tensor<B, 3>| {
        let rows = at
            .iter()
            .enumerate()
            .map(|(i, &p)| x.clone().slice([i..i + 1, p..p + 1]))
            .collect();
        Tensor::cat(rows, 0) + a
    };
    let got = B::fused_linear(
        picked(
            tensor::<B, 3>(&xv, [n, l, c], DType::F32, device),
            tensor::<B, 3>(&av, [n, 1, c], DType::F32, device),
        ),
        tensor::<B, 2>(&wv, [c, o], DType::F32, device),
        Some(tensor::<B, 1>(&bv, [o], DType::F32, device)),
    );
    // The same rows copied out on the host, through Burn's linear on the CPU.
    let rows: Vec<f32> = (0..n)
        .flat_map(|i| {
            let row = &xv[(i * l + at[i]) * c..(i * l + at[i] + 1) * c];
            row.iter()
                .zip(&av[i * c..(i + 1) * c])
                .map(|(x, a)| x + a)
                .collect::<Vec<_>>()
        })
        .collect();
    let want = plain::linear(cpu(&rows, [n, 1, c]), cpu(&wv, [c, o]), Some(cpu(&bv, [o])));
    assert_eq!(got.dims(), [n, 1, o]);
    check("linear on picked rows", values(got), values(want), TOL_F32);
}
crate::on_backends!(fused_linear_rows, linear_picked_rows);

/// The chunked plain attention (the CPU path at large sizes) equals one-shot attention.
#[test]
fn chunked_attention_equals_full() {
    let (n, h, l, s, d) = (1, 2, 50, 33, 16);
    let q = cpu(&data(n * h * l * d, 0.2, 1.0, 0.0), [n, h, l, d]);
    let k = cpu(&data(n * h * s * d, 0.5, 1.0, 0.0), [n, h, s, d]);
    let v = cpu(&data(n * h * s * d, 0.7, 1.0, 0.0), [n, h, s, d]);
    let want = plain::attention_full(q.clone(), k.clone(), v.clone());
    // A budget of 7 rows' scores: 8 chunks, the last one partial.
    let got = plain::attention_chunked(q, k, v, 7 * n * h * s);
    check("chunked attention", values(got), values(want), TOL_F32);
}

#[test]
fn kernel_set_parses_the_environment_syntax() {
    assert_eq!(KernelSet::parse("").unwrap(), KernelSet::ALL);
    assert_eq!(KernelSet::parse("all").unwrap(), KernelSet::ALL);
    assert_eq!(KernelSet::parse("none").unwrap(), KernelSet::NONE);
    let set = KernelSet::parse("geglu, attention").unwrap();
    assert!(!set.group_norm && set.geglu && set.attention);
    assert_eq!(set.to_string(), "geglu,attention");
    let set = KernelSet::parse("conv,winograd").unwrap();
    assert!(set.conv && set.winograd && !set.linear);
    assert_eq!(set.to_string(), "conv,winograd");
    let err = KernelSet::parse("group_norm,flash").unwrap_err();
    assert!(err.contains("`flash`"), "{err}");
}
