//! The CPU kernels against the plain Burn ops (`plain.rs`) on Flex, GroupNorm also
//! against f64 on the host, and the f32 `exp`/`erf` against f64 references.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};

use super::math::{self, erf, exp};
use super::panels;
use crate::reference::{data, group_norm_f64};
use crate::{plain, Activation, FusedOps, KernelSet};

/// Relative error allowed in f32: well inside the project's parity bound (1e-4).
const TOL_F32: f64 = 1e-5;

/// Relative error allowed when the tensors are stored in f16: the output is rounded
/// once to f16 (unit roundoff 4.9e-4) on top of the f32 computation, and the plain ops
/// may round intermediates too; 2e-3 is four roundings.
const TOL_F16: f64 = 2e-3;

/// The same for bfloat16 (unit roundoff 3.9e-3): two roundings.
const TOL_BF16: f64 = 8e-3;

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => TOL_F32,
        DType::F16 => TOL_F16,
        _ => TOL_BF16,
    }
}

fn tensor<const D: usize>(v: &[f32], shape: [usize; D], dtype: DType) -> Tensor<Flex, D> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), shape),
        (&Default::default(), dtype),
    )
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
}

/// `‖got − want‖ / ‖want‖` in f64.
fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let err = rel_error(got, want);
    println!("{what}: relative error {err:.2e} (limit {tol:.0e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// Runs `op` on `input` twice: owning the only handle (the kernels then overwrite the
/// input's buffer) and with a clone kept (a new buffer), checks the clone is untouched
/// and both results agree exactly; returns the result.
fn both_ownerships<const D: usize, const E: usize>(
    input: Tensor<Flex, D>,
    op: impl Fn(Tensor<Flex, D>) -> Tensor<Flex, E>,
) -> Tensor<Flex, E> {
    let kept = input.clone();
    let before = values(kept.clone());
    let shared = op(input.clone());
    assert_eq!(values(kept), before, "the kernel wrote into a shared input");
    let owned = op(input);
    assert_eq!(
        values(owned.clone()),
        values(shared),
        "in place and copying differ"
    );
    owned
}

/// The tests must run our kernels, not the plain ops `HYPERGEN_KERNELS` may select.
fn kernels_on() {
    assert_eq!(
        KernelSet::current(),
        KernelSet::ALL,
        "HYPERGEN_KERNELS turns kernels off; unset it to run the kernel tests"
    );
}

// ---------------------------------------------------------------------------------
// exp and erf

/// Every f32 in `[lo, hi]` at about `per_unit` points per unit, plus both ends.
fn grid(lo: f32, hi: f32, per_unit: f32) -> Vec<f32> {
    let steps = ((hi - lo) * per_unit) as usize;
    let mut v: Vec<f32> = (0..=steps)
        .map(|i| lo + (hi - lo) * (i as f32 / steps as f32))
        .collect();
    v.push(hi);
    v
}

/// `f` (mul + add) and `g` (fused multiply-add) over `xs`: the two arithmetic forms the
/// kernels compile to, depending on the CPU.
fn both_forms(f: impl Fn(f32) -> f32, g: impl Fn(f32) -> f32, xs: &[f32]) -> [Vec<f32>; 2] {
    [
        xs.iter().map(|&x| f(x)).collect(),
        xs.iter().map(|&x| g(x)).collect(),
    ]
}

fn check_exp(xs: &[f32], got: &[f32], what: &str) {
    // Results below e^-86.5 (2.7e-38, about 2^-125) flush to zero (`math::exp`'s docs).
    let flush = (-86.5f64).exp();
    let mut worst = (0f64, 0f32);
    for (&x, &y) in xs.iter().zip(got) {
        let want = (x as f64).exp();
        if want >= flush && want <= f32::MAX as f64 {
            let rel = ((y as f64 - want) / want).abs();
            if rel > worst.0 {
                worst = (rel, x);
            }
        } else if want < flush {
            assert!(
                y >= 0.0 && (y as f64) < flush,
                "{what}: exp({x}) = {y:e}, want {want:e}"
            );
        } else {
            assert_eq!(y, f32::INFINITY, "{what}: exp({x}) overflows");
        }
    }
    println!(
        "{what}: worst relative error {:.3e} at x = {}",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1.5e-7,
        "{what}: relative error {:.3e} at x = {}",
        worst.0,
        worst.1
    );
}

#[test]
fn exp_is_accurate_over_f32_range() {
    let mut xs = grid(-104.5, 89.5, 20_000.0);
    // Around 0 densely, tiny arguments, the overflow and underflow edges.
    xs.extend(grid(-1.0, 1.0, 1_000_000.0));
    xs.extend([
        1e-30,
        -1e-30,
        1e-10,
        -1e-10,
        f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
    ]);
    xs.extend(grid(88.0, 89.0, 1_000_000.0));
    xs.extend(grid(-104.0, -86.0, 100_000.0));
    let [plain, fused] = both_forms(exp::<false>, exp::<true>, &xs);
    check_exp(&xs, &plain, "exp (mul + add)");
    check_exp(&xs, &fused, "exp (fma)");
    let mut dispatched = xs.clone();
    math::exp_slice(&mut dispatched);
    check_exp(&xs, &dispatched, "exp (dispatched)");
}

#[test]
fn exp_special_values() {
    for f in [exp::<false> as fn(f32) -> f32, exp::<true>] {
        assert_eq!(f(0.0), 1.0);
        assert_eq!(f(-0.0), 1.0);
        assert_eq!(f(f32::INFINITY), f32::INFINITY);
        assert_eq!(f(f32::NEG_INFINITY), 0.0);
        assert!(f(f32::NAN).is_nan());
        assert_eq!(f(88.8), f32::INFINITY);
        assert_eq!(f(1000.0), f32::INFINITY);
        assert!(f(88.72).is_finite());
        assert_eq!(f(-110.0), 0.0);
        assert_eq!(f(-1e30), 0.0);
        // Normal results down to 2^-125, then zero (no subnormals).
        assert!(f(-86.0) >= 2.0 * f32::MIN_POSITIVE);
        assert_eq!(f(-87.0), 0.0);
        assert_eq!(f(-100.0), 0.0);
        // The largest finite results and the first overflow.
        assert!(f(88.72).is_finite() && f(88.72) > 3.3e38);
        assert_eq!(f(88.723), f32::INFINITY);
    }
    let mut v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0];
    math::exp_slice(&mut v);
    assert!(v[0].is_nan());
    assert_eq!(&v[1..], &[f32::INFINITY, 0.0, 1.0]);
}

fn check_erf(xs: &[f32], got: &[f32], what: &str) {
    let mut worst = (0f64, 0f32);
    for (&x, &y) in xs.iter().zip(got) {
        let want = libm::erf(x as f64);
        let abs = (y as f64 - want).abs();
        if abs > worst.0 {
            worst = (abs, x);
        }
        assert!(y.abs() <= 1.0, "{what}: |erf({x})| = {y} > 1");
        // Near 0 the error must be relative too: erf(x) ≈ 2x/√π.
        if x.abs() < 1e-3 && x.abs() >= f32::MIN_POSITIVE {
            let rel = abs / want.abs();
            assert!(rel < 1e-6, "{what}: erf({x:e}) = {y:e}, want {want:e}");
        }
    }
    println!(
        "{what}: worst absolute error {:.3e} at x = {}",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1.5e-7,
        "{what}: absolute error {:.3e} at x = {}",
        worst.0,
        worst.1
    );
}

#[test]
fn erf_is_accurate() {
    let mut xs = grid(-10.0, 10.0, 100_000.0);
    xs.extend(grid(-4.5, 4.5, 1_000_000.0));
    xs.extend([1e-30, -1e-30, 1e-38, 1e-44, -1e-44, 1e-6, -1e-6, 1e-3]);
    xs.extend([30.0, -30.0, f32::MAX, f32::MIN]);
    let [plain, fused] = both_forms(erf::<false>, erf::<true>, &xs);
    check_erf(&xs, &plain, "erf (mul + add)");
    check_erf(&xs, &fused, "erf (fma)");
    let mut dispatched = xs.clone();
    math::erf_slice(&mut dispatched);
    check_erf(&xs, &dispatched, "erf (dispatched)");
}

#[test]
fn erf_special_values() {
    for f in [erf::<false> as fn(f32) -> f32, erf::<true>] {
        assert_eq!(f(0.0), 0.0);
        assert_eq!(f(f32::INFINITY), 1.0);
        assert_eq!(f(f32::NEG_INFINITY), -1.0);
        assert!(f(f32::NAN).is_nan());
        // Odd symmetry holds exactly (clamp, x² and the sign of x are symmetric).
        for x in grid(-6.0, 6.0, 100.0) {
            assert_eq!(f(-x), -f(x), "erf(-{x})");
        }
    }
}

// ---------------------------------------------------------------------------------
// GroupNorm

struct GnCase {
    shape: [usize; 3],
    groups: usize,
    affine: bool,
    silu: bool,
    scale: f32,
    shift: f32,
    dtype: DType,
    /// Also compare with the plain ops (whose f32 statistics are not exact enough for
    /// a mean far larger than the spread).
    vs_plain: bool,
}

fn group_norm_case(case: GnCase) {
    kernels_on();
    let GnCase {
        shape: [n, c, l],
        groups,
        affine,
        silu,
        scale,
        shift,
        dtype,
        vs_plain,
    } = case;
    // The references see the same (rounded) inputs as the kernel.
    let round = |v: Vec<f32>| values(tensor(&v, [v.len()], dtype));
    let x = round(data(n * c * l, 0.3, scale, shift));
    let gamma = round(data(c, 1.7, 0.5, 1.0));
    let beta = round(data(c, 2.9, 0.3, 0.0));
    let tol = tolerance(dtype);
    let what = format!("group_norm {dtype:?} [{n},{c},{l}] g{groups} affine={affine} silu={silu} x={shift}±{scale}");
    let t_affine = || affine.then(|| (tensor(&gamma, [c], dtype), tensor(&beta, [c], dtype)));
    let got = both_ownerships(tensor(&x, [n, c, l], dtype), |x| {
        Flex::fused_group_norm(x, t_affine(), groups, 1e-5, silu)
    });
    assert_eq!(got.dims(), [n, c, l]);
    assert_eq!(got.dtype(), dtype, "output keeps the input dtype");
    let got = values(got);
    let exact = group_norm_f64(
        &x,
        [n, c, l],
        groups,
        affine.then_some((&gamma[..], &beta[..])),
        silu,
    );
    check(&format!("{what} vs f64"), &got, &exact, tol);
    if vs_plain {
        let want = plain::group_norm(tensor(&x, [n, c, l], dtype), t_affine(), groups, 1e-5, silu);
        check(&format!("{what} vs plain"), &got, &values(want), tol);
    }
}

const GN: GnCase = GnCase {
    shape: [2, 32, 45],
    groups: 8,
    affine: true,
    silu: true,
    scale: 2.0,
    shift: 0.0,
    dtype: DType::F32,
    vs_plain: true,
};

#[test]
fn group_norm_small_groups() {
    group_norm_case(GN);
    group_norm_case(GnCase {
        affine: false,
        silu: false,
        ..GN
    });
    group_norm_case(GnCase {
        affine: true,
        silu: false,
        ..GN
    });
    group_norm_case(GnCase {
        affine: false,
        silu: true,
        ..GN
    });
}

#[test]
fn group_norm_odd_shapes() {
    // Odd channel and length counts, one channel per group, one group.
    group_norm_case(GnCase {
        shape: [3, 6, 7],
        groups: 3,
        ..GN
    });
    group_norm_case(GnCase {
        shape: [1, 5, 1],
        groups: 5,
        ..GN
    });
    group_norm_case(GnCase {
        shape: [2, 4, 333],
        groups: 1,
        ..GN
    });
}

#[test]
fn group_norm_sdxl_shapes() {
    // UNet's first ResNet block at 512² latents (64²) and a VAE layer (several blocks
    // per group, partial last block).
    group_norm_case(GnCase {
        shape: [2, 320, 4096],
        groups: 32,
        ..GN
    });
    group_norm_case(GnCase {
        shape: [1, 128, 5000],
        groups: 32,
        silu: false,
        shift: -3.0,
        ..GN
    });
}

#[test]
fn group_norm_large_mean() {
    // A mean 100 times the spread, then 10⁵ times (values 1000 ± 0.01): f32 sums of raw
    // values or a mean rounded to f32 would lose the spread's digits.
    group_norm_case(GnCase {
        shape: [1, 64, 1100],
        groups: 8,
        silu: false,
        shift: 100.0,
        ..GN
    });
    for silu in [false, true] {
        group_norm_case(GnCase {
            shape: [2, 16, 3000],
            groups: 4,
            silu,
            scale: 0.01,
            shift: 1000.0,
            vs_plain: false,
            ..GN
        });
    }
    // Channels with different offsets inside one group.
    kernels_on();
    let (n, c, l) = (1, 8, 2000);
    let x: Vec<f32> = data(n * c * l, 0.7, 0.5, 0.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v + 500.0 + 50.0 * (i / l) as f32)
        .collect();
    let got = both_ownerships(tensor(&x, [n, c, l], DType::F32), |x| {
        Flex::fused_group_norm(x, None, 2, 1e-5, true)
    });
    let exact = group_norm_f64(&x, [n, c, l], 2, None, true);
    check(
        "group_norm channel offsets vs f64",
        &values(got),
        &exact,
        TOL_F32,
    );
}

#[test]
fn group_norm_half_precision() {
    for dtype in [DType::F16, DType::BF16] {
        group_norm_case(GnCase {
            shape: [2, 64, 1100],
            groups: 32,
            shift: 0.5,
            dtype,
            ..GN
        });
    }
}

#[test]
fn group_norm_strided_input() {
    // A transposed view: the kernel copies it to contiguous first.
    kernels_on();
    let (n, c, l) = (2, 12, 50);
    let x = data(n * c * l, 0.1, 1.0, 0.3);
    let t = tensor(&x, [n, l, c], DType::F32).swap_dims(1, 2);
    let contiguous = values(t.clone());
    let got = Flex::fused_group_norm(t, None, 4, 1e-5, true);
    let exact = group_norm_f64(&contiguous, [n, c, l], 4, None, true);
    check(
        "group_norm transposed view vs f64",
        &values(got),
        &exact,
        TOL_F32,
    );
}

// ---------------------------------------------------------------------------------
// GEGLU

/// GEGLU on the host in f64 with libm's `erf`.
fn geglu_f64(x: &[f32], half: usize) -> Vec<f32> {
    x.chunks(2 * half)
        .flat_map(|row| {
            let (value, gate) = row.split_at(half);
            value.iter().zip(gate).map(|(&v, &g)| {
                let g = g as f64;
                (v as f64 * 0.5 * g * (1.0 + libm::erf(g / std::f64::consts::SQRT_2))) as f32
            })
        })
        .collect()
}

fn geglu_case(dtype: DType, [n, l, w]: [usize; 3], scale: f32) {
    kernels_on();
    let x = data(n * l * w, 0.9, scale, 0.1);
    let x = values(tensor(&x, [n * l * w], dtype));
    let got = both_ownerships(tensor(&x, [n, l, w], dtype), Flex::fused_geglu);
    assert_eq!(got.dims(), [n, l, w / 2]);
    assert_eq!(got.dtype(), dtype);
    let got = values(got);
    let want = values(plain::geglu(tensor(&x, [n, l, w], dtype)));
    let tol = tolerance(dtype);
    let what = format!("geglu {dtype:?} [{n},{l},{w}] ±{scale}");
    check(&format!("{what} vs plain"), &got, &want, tol);
    check(&format!("{what} vs f64"), &got, &geglu_f64(&x, w / 2), tol);
}

#[test]
fn geglu_shapes() {
    geglu_case(DType::F32, [2, 77, 80], 3.0);
    geglu_case(DType::F32, [1, 300, 2 * 640], 3.0);
    // Odd sizes, gates far into both tails (erf clamped at ±4, GELU ≈ 0 and ≈ x).
    geglu_case(DType::F32, [3, 5, 2 * 33], 12.0);
    geglu_case(DType::F32, [1, 1, 2], 1.0);
    // SDXL's widest projection with several rows per task and a partial last task.
    geglu_case(DType::F32, [1, 130, 2 * 1280], 2.0);
}

#[test]
fn geglu_half_precision() {
    geglu_case(DType::F16, [2, 64, 2 * 96], 3.0);
    geglu_case(DType::BF16, [2, 33, 2 * 40], 3.0);
}

#[test]
fn geglu_strided_input() {
    kernels_on();
    // A row window of a wider tensor: neither contiguous nor at offset 0.
    let (n, l, w) = (2, 9, 24);
    let x = data(n * l * (w + 6), 0.4, 3.0, 0.0);
    let t = tensor(&x, [n, l, w + 6], DType::F32).narrow(2, 4, w);
    let got = values(Flex::fused_geglu(t.clone()));
    let want = values(plain::geglu(t));
    check("geglu narrowed view vs plain", &got, &want, TOL_F32);
}

// ---------------------------------------------------------------------------------
// Attention

/// Inputs for one attention case, as the model builds them: `[N, L, H·D]` sequences split
/// into heads (strided views).
struct AttnCase {
    n: usize,
    heads: usize,
    l: usize,
    s: usize,
    d: usize,
    /// Spread of q and k (large values make large scores: the max subtraction matters).
    scale: f32,
    dtype: DType,
}

fn split(t: Tensor<Flex, 3>, n: usize, heads: usize, d: usize) -> Tensor<Flex, 4> {
    t.reshape([n as i32, -1, heads as i32, d as i32])
        .swap_dims(1, 2)
}

fn attention_case(case: AttnCase) {
    kernels_on();
    let AttnCase {
        n,
        heads,
        l,
        s,
        d,
        scale,
        dtype,
    } = case;
    let round = |v: Vec<f32>, len| values(tensor(&v, [len], dtype));
    let q = round(data(n * l * heads * d, 0.1, scale, 0.0), n * l * heads * d);
    let k = round(data(n * s * heads * d, 0.4, scale, 0.2), n * s * heads * d);
    let v = round(data(n * s * heads * d, 0.8, 1.0, -0.1), n * s * heads * d);
    let inputs = |dtype| {
        (
            split(tensor(&q, [n, l, heads * d], dtype), n, heads, d),
            split(tensor(&k, [n, s, heads * d], dtype), n, heads, d),
            split(tensor(&v, [n, s, heads * d], dtype), n, heads, d),
        )
    };
    let (tq, tk, tv) = inputs(DType::F32);
    let want = values(plain::attention_full(tq, tk, tv));
    let (tq, tk, tv) = inputs(dtype);
    let got = Flex::fused_attention(tq, tk, tv);
    assert_eq!(got.dims(), [n, heads, l, d]);
    assert_eq!(got.dtype(), dtype);
    if dtype == DType::F32 && heads > 1 {
        // Our kernel's mark: the output lies in [N, L, H, D] order, so merging heads is
        // free (the plain path returns contiguous [N, H, L, D]).
        let prim = got.clone().swap_dims(1, 2).into_primitive().tensor();
        assert!(
            prim.is_contiguous(),
            "attention output in [N, L, H, D] order"
        );
    }
    let tol = tolerance(dtype);
    check(
        &format!("attention {dtype:?} n{n} h{heads} l{l} s{s} d{d} ±{scale} vs plain"),
        &values(got),
        &want,
        tol,
    );
}

const ATTN: AttnCase = AttnCase {
    n: 2,
    heads: 2,
    l: 130,
    s: 130,
    d: 64,
    scale: 1.5,
    dtype: DType::F32,
};

#[test]
fn attention_self() {
    attention_case(ATTN);
    // Many row blocks, the last one partial.
    attention_case(AttnCase {
        n: 1,
        heads: 1,
        l: 1100,
        s: 1100,
        ..ATTN
    });
    // SDXL's mid-resolution shape, reduced in batch and heads.
    attention_case(AttnCase {
        n: 1,
        heads: 2,
        l: 1024,
        s: 1024,
        ..ATTN
    });
}

#[test]
fn attention_cross() {
    // Text tokens: S = 77 ≠ L, head widths 64 and 80, L not a multiple of any block.
    attention_case(AttnCase {
        l: 1000,
        s: 77,
        ..ATTN
    });
    attention_case(AttnCase {
        heads: 3,
        l: 100,
        s: 77,
        d: 80,
        ..ATTN
    });
    attention_case(AttnCase {
        n: 1,
        heads: 1,
        l: 1,
        s: 1,
        d: 8,
        ..ATTN
    });
    attention_case(AttnCase {
        heads: 3,
        l: 7,
        s: 300,
        d: 40,
        ..ATTN
    });
}

#[test]
fn attention_wide_head() {
    // The VAE's single 512-wide head (also an odd length).
    attention_case(AttnCase {
        n: 1,
        heads: 1,
        l: 301,
        s: 301,
        d: 512,
        ..ATTN
    });
}

#[test]
fn attention_large_scores() {
    // Scores in the hundreds: exp overflows unless each row's max is subtracted.
    attention_case(AttnCase {
        scale: 8.0,
        l: 64,
        s: 90,
        ..ATTN
    });
}

#[test]
fn attention_half_precision() {
    attention_case(AttnCase {
        l: 96,
        s: 77,
        dtype: DType::F16,
        ..ATTN
    });
    attention_case(AttnCase {
        l: 50,
        s: 60,
        d: 80,
        dtype: DType::BF16,
        ..ATTN
    });
}

#[test]
fn attention_other_strides() {
    kernels_on();
    let (n, h, l, s, d) = (2, 3, 70, 45, 24);
    let q = data(n * h * (l + 5) * d, 0.3, 1.2, 0.0);
    let k = data(n * h * s * d, 0.6, 1.2, 0.0);
    let v = data(n * h * s * d, 0.9, 1.0, 0.0);
    // q: a window of rows (start offset, parent longer than L); k: stored as [N, H, D, S]
    // and transposed (unit stride along S); v: contiguous [N, H, S, D]; and a
    // flipped k (negative strides).
    let tq = tensor(&q, [n, h, l + 5, d], DType::F32).narrow(2, 3, l);
    let tk = tensor(&k, [n, h, d, s], DType::F32).swap_dims(2, 3);
    let tv = tensor(&v, [n, h, s, d], DType::F32);
    let want = values(plain::attention_full(tq.clone(), tk.clone(), tv.clone()));
    let got = values(Flex::fused_attention(tq.clone(), tk.clone(), tv.clone()));
    check("attention narrowed q, transposed k", &got, &want, TOL_F32);
    let tk = tk.flip([2]);
    let tv = tv.flip([2]);
    let want = values(plain::attention_full(tq.clone(), tk.clone(), tv.clone()));
    let got = values(Flex::fused_attention(tq, tk, tv));
    check("attention flipped k and v", &got, &want, TOL_F32);
}

/// Causal attention in f64 on the host, `[N, H, L, D]` contiguous inputs: query `i`
/// sees keys `0..=i + S − L`.
fn causal_attention_f64(q: &[f32], k: &[f32], v: &[f32], [n, h, l, s, d]: [usize; 5]) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * h * l * d);
    for head in 0..n * h {
        let (q, k, v) = (&q[head * l * d..], &k[head * s * d..], &v[head * s * d..]);
        for i in 0..l {
            let seen = i + s - l + 1;
            let scores: Vec<f64> = (0..seen)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                        .sum();
                    dot / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for c in 0..d {
                let acc: f64 = (0..seen).map(|j| e[j] * v[j * d + c] as f64).sum();
                out.push((acc / total) as f32);
            }
        }
    }
    out
}

#[test]
fn attention_causal() {
    kernels_on();
    // CLIP's 77 tokens; several row blocks (the mask at each block's offset); L < S
    // (the mask aligned at the end); half precision.
    for (n, h, l, s, d, dtype) in [
        (2, 3, 77, 77, 64, DType::F32),
        (1, 1, 700, 700, 32, DType::F32),
        (1, 2, 50, 80, 40, DType::F32),
        (1, 2, 77, 77, 64, DType::F16),
    ] {
        let round = |v: Vec<f32>| values(tensor(&v, [v.len()], dtype));
        let q = round(data(n * h * l * d, 0.2, 1.5, 0.0));
        let k = round(data(n * h * s * d, 0.5, 1.5, 0.1));
        let v = round(data(n * h * s * d, 0.7, 1.0, 0.0));
        let want = causal_attention_f64(&q, &k, &v, [n, h, l, s, d]);
        let (tq, tk, tv) = (
            tensor(&q, [n, h, l, d], dtype),
            tensor(&k, [n, h, s, d], dtype),
            tensor(&v, [n, h, s, d], dtype),
        );
        let what = format!("causal attention {dtype:?} n{n} h{h} l{l} s{s} d{d}");
        let burn = values(plain::attention_causal(tq.clone(), tk.clone(), tv.clone()));
        let got = Flex::fused_causal_attention(tq, tk, tv);
        assert_eq!((got.dims(), got.dtype()), ([n, h, l, d], dtype), "{what}");
        let got = values(got);
        check(&format!("{what} vs f64"), &got, &want, tolerance(dtype));
        check(&format!("{what} vs Burn"), &got, &burn, tolerance(dtype));
    }
}

// ---------------------------------------------------------------------------------
// activations

#[test]
fn activations() {
    kernels_on();
    let xs = grid(-12.0, 12.0, 97.0);
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let tanh_gelu = |x: f64| {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    };
    let cases: [(Activation, &dyn Fn(f64) -> f64); 4] = [
        (Activation::Gelu, &|x| {
            0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
        }),
        (Activation::GeluTanh, &tanh_gelu),
        (Activation::QuickGelu, &|x| x * sigmoid(1.702 * x)),
        (Activation::Silu, &|x| x * sigmoid(x)),
    ];
    for (act, f) in cases {
        let want: Vec<f32> = xs.iter().map(|&x| f(x as f64) as f32).collect();
        // Held elsewhere too (a copy) and alone (in place).
        let got = values(both_ownerships(tensor(&xs, [xs.len()], DType::F32), |t| {
            Flex::fused_activation(t, act)
        }));
        // Absolute error against f64, relative to max(|y|, 1): near zero crossings the
        // results are tiny and the rounding of `x` itself dominates.
        for ((&x, &g), &w) in xs.iter().zip(&got).zip(&want) {
            let err = (g as f64 - w as f64).abs() / (w.abs() as f64).max(1.0);
            assert!(err < 2e-6, "{act:?} at {x}: {g} vs {w}");
        }
        check(
            &format!("{act:?} vs Burn"),
            &got,
            &values(plain::activation(tensor(&xs, [xs.len()], DType::F32), act)),
            TOL_F32,
        );
    }
    let big: Vec<f32> = data(300_000, 0.3, 4.0, 0.0);
    let got = values(Flex::fused_activation(
        tensor(&big, [300_000], DType::F32),
        Activation::Gelu,
    ));
    let want = values(plain::activation(
        tensor(&big, [300_000], DType::F32),
        Activation::Gelu,
    ));
    check("gelu over several tasks", &got, &want, TOL_F32);
    // Half precision: cast around the kernel.
    let got = values(Flex::fused_activation(
        tensor(&xs, [xs.len()], DType::F16),
        Activation::QuickGelu,
    ));
    let want = values(plain::activation(
        tensor(&xs, [xs.len()], DType::F16),
        Activation::QuickGelu,
    ));
    check("quick gelu f16", &got, &want, TOL_F16);
}

// ---------------------------------------------------------------------------------
// convolution

/// Direct convolution in f64 on the host: the reference independent of Burn.
fn conv2d_f64(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    [n, ci, h, wd]: [usize; 4],
    [co, kh, kw]: [usize; 3],
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    let mut out = Vec::with_capacity(n * co * ho * wo);
    for b in 0..n {
        for o in 0..co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = bias.map_or(0.0, |b| b[o] as f64);
                    for c in 0..ci {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((b * ci + c) * h + iy as usize) * wd + ix as usize];
                                let wv = w[((o * ci + c) * kh + ky) * kw + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out.push(acc as f32);
                }
            }
        }
    }
    out
}

struct ConvCase {
    input: [usize; 4],
    out_channels: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: usize,
    bias: bool,
}

/// Our convolution against the f64 host reference and against Burn's `conv2d`.
fn conv_case(case: ConvCase) {
    kernels_on();
    let ConvCase {
        input,
        out_channels: co,
        kernel: [kh, kw],
        stride,
        padding,
        bias,
    } = case;
    let ci = input[1];
    let xv = data(input.iter().product(), 0.3, 1.0, 0.1);
    let wv = data(co * ci * kh * kw, 1.7, 0.2, 0.0);
    let bv = data(co, 2.9, 0.5, 0.2);
    let x = tensor(&xv, input, DType::F32);
    let w = tensor(&wv, [co, ci, kh, kw], DType::F32);
    let b = bias.then(|| tensor(&bv, [co], DType::F32));
    let what = format!("conv {input:?} → {co}, {kh}×{kw}, stride {stride}, padding {padding}");
    let got = Flex::fused_conv2d(x.clone(), w.clone(), b.clone(), stride, padding);
    let burn = plain::conv2d(x, w, b, stride, padding);
    assert_eq!(got.dims(), burn.dims(), "{what}: shape");
    let got = values(got);
    let want = conv2d_f64(
        &xv,
        &wv,
        bias.then_some(&bv[..]),
        input,
        [co, kh, kw],
        stride,
        padding,
    );
    check(&format!("{what} vs f64"), &got, &want, TOL_F32);
    check(&format!("{what} vs Burn"), &got, &values(burn), TOL_F32);
}

#[test]
fn conv_shapes() {
    let case = |input, out_channels, kernel, stride, padding, bias| {
        conv_case(ConvCase {
            input,
            out_channels,
            kernel,
            stride,
            padding,
            bias,
        })
    };
    // SDXL's kinds: 3×3 same-size, 3×3 stride-2 downsample, 1×1 shortcut (with and
    // without bias), and the VAE's 3-channel image convolutions.
    case([2, 8, 9, 11], 12, [3, 3], 1, 1, true);
    case([1, 6, 10, 7], 5, [3, 3], 2, 1, true);
    case([2, 6, 9, 9], 4, [3, 3], 2, 0, false);
    case([2, 16, 5, 6], 24, [1, 1], 1, 0, true);
    case([1, 16, 5, 6], 8, [1, 1], 1, 0, false);
    case([1, 3, 12, 12], 8, [3, 3], 1, 1, true);
    case([1, 8, 12, 12], 3, [3, 3], 1, 1, true);
    // Edges: kernels wider than the input without padding's help on one axis, a single
    // column, padding wider than the kernel's reach, non-square kernels, 1×1 padded.
    case([1, 4, 3, 1], 2, [3, 3], 1, 1, true);
    case([2, 3, 4, 5], 2, [3, 3], 1, 2, true);
    case([1, 5, 6, 7], 3, [1, 3], 1, 1, true);
    case([1, 5, 6, 7], 3, [3, 1], 2, 1, false);
    case([1, 4, 5, 5], 3, [1, 1], 1, 1, true);
    case([1, 4, 7, 8], 3, [5, 5], 3, 2, true);
    // Small images as one GEMM over the batch, with enough work to split its output
    // channels across threads.
    case([2, 32, 8, 8], 160, [3, 3], 1, 1, true);
    case([3, 16, 6, 5], 136, [1, 1], 1, 0, false);
}

/// Large enough that the output is split into several row blocks per image (and the
/// pointwise case into several pixel blocks), so the blocks' seams are checked.
#[test]
fn conv_row_blocks() {
    let x = tensor(
        &data(2 * 64 * 72 * 40, 0.5, 1.0, 0.0),
        [2, 64, 72, 40],
        DType::F32,
    );
    for (co, k, stride, pad) in [(48, 3, 1, 1), (32, 3, 2, 1), (40, 1, 1, 0)] {
        let w = tensor(
            &data(co * 64 * k * k, 1.1, 0.1, 0.0),
            [co, 64, k, k],
            DType::F32,
        );
        let b = tensor(&data(co, 2.2, 0.3, 0.0), [co], DType::F32);
        let got = Flex::fused_conv2d(x.clone(), w.clone(), Some(b.clone()), stride, pad);
        let want = plain::conv2d(x.clone(), w, Some(b), stride, pad);
        check(
            &format!("conv [2, 64, 72, 40] → {co}, {k}×{k}, stride {stride}"),
            &values(got),
            &values(want),
            TOL_F32,
        );
    }
}

/// `[N, C, H, W]` host values upsampled 2× (nearest): `[N, C, 2H, 2W]`.
fn upsample2x_host(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut out = Vec::with_capacity(4 * x.len());
    for plane in x.chunks_exact(h * w).take(n * c) {
        for oy in 0..2 * h {
            out.extend((0..2 * w).map(|ox| plane[(oy / 2) * w + ox / 2]));
        }
    }
    out
}

/// The convolution of a 2× upsampled input, read through im2col, against the f64
/// reference on the upsampled values and against Burn's upsampling then convolution:
/// odd and even sizes (taps starting on either copy of a source column), padding wider
/// than one, one GEMM over a small batch, several row blocks per image, and half
/// precision (Burn's ops).
#[test]
fn upsample_conv() {
    kernels_on();
    for (input, co, k, padding) in [
        ([1, 5, 7, 9], 6, 3, 1),
        ([2, 3, 4, 5], 4, 3, 1),
        ([1, 4, 5, 6], 3, 5, 2),
        ([1, 2, 3, 3], 2, 3, 0),
        ([2, 8, 6, 5], 24, 3, 1),
        ([2, 16, 36, 20], 24, 3, 1),
    ] {
        let ci = input[1];
        let xv = data(input.iter().product(), 0.7, 1.0, 0.1);
        let wv = data(co * ci * k * k, 1.3, 0.2, 0.0);
        let bv = data(co, 2.1, 0.5, 0.2);
        let x = tensor(&xv, input, DType::F32);
        let w = tensor(&wv, [co, ci, k, k], DType::F32);
        let b = tensor(&bv, [co], DType::F32);
        let what = format!("upsample 2× + conv {input:?} → {co}, {k}×{k}, padding {padding}");
        let got = Flex::fused_upsample_conv2d(x.clone(), w.clone(), Some(b.clone()), padding);
        let burn = plain::conv2d(
            plain::upsample_nearest2x(x.clone()),
            w.clone(),
            Some(b.clone()),
            1,
            padding,
        );
        assert_eq!(got.dims(), burn.dims(), "{what}: shape");
        let got = values(got);
        let [n, _, h, wd] = input;
        let want = conv2d_f64(
            &upsample2x_host(&xv, input),
            &wv,
            Some(&bv),
            [n, ci, 2 * h, 2 * wd],
            [co, k, k],
            1,
            padding,
        );
        check(&format!("{what} vs f64"), &got, &want, TOL_F32);
        check(&format!("{what} vs Burn"), &got, &values(burn), TOL_F32);
    }
    let x = tensor(
        &data(2 * 3 * 4 * 5, 0.5, 1.0, 0.0),
        [2, 3, 4, 5],
        DType::F16,
    );
    let w = tensor(&data(4 * 3 * 9, 1.1, 0.2, 0.0), [4, 3, 3, 3], DType::F16);
    let got = Flex::fused_upsample_conv2d(x.clone(), w.clone(), None, 1);
    assert_eq!(got.dtype(), DType::F16);
    let want = plain::conv2d(plain::upsample_nearest2x(x), w, None, 1, 1);
    assert_eq!(values(got), values(want), "half precision runs Burn's ops");
}

/// Winograd's F(2×2, 3×3) against the f64 direct convolution and the direct kernel:
/// odd sizes (a last tile half outside the image), channel counts off the vector width,
/// no bias, upsampling read through, several blocks per image (their seams), and an
/// image too small to give each thread a block (one block split inside).
#[test]
fn winograd_conv() {
    use super::{conv, winograd};
    for (input, co, upsample, bias) in [
        ([2, 32, 9, 11], 40, 1, true),
        ([1, 33, 1, 1], 35, 1, true),
        ([2, 8, 7, 5], 3, 2, false),
        ([1, 32, 70, 34], 36, 1, true),
        ([1, 40, 35, 17], 32, 2, true),
        ([2, 64, 4, 4], 48, 1, true),
    ] {
        let ci = input[1];
        let p = conv::Params {
            input,
            out_channels: co,
            kernel: [3, 3],
            stride: 1,
            padding: 1,
            upsample,
        };
        let xv = data(input.iter().product(), 0.9, 1.0, 0.1);
        let wv = data(co * ci * 9, 1.9, 0.2, 0.0);
        let bv = data(co, 2.3, 0.5, 0.2);
        let b = bias.then_some(&bv[..]);
        let what = format!("winograd {input:?} → {co}, upsample {upsample}, bias {bias}");
        let got = winograd::conv2d(&xv, &wv, b, p);
        let [n, _, h, w] = input;
        let up = [n, ci, h * upsample, w * upsample];
        let xu = if upsample == 2 {
            upsample2x_host(&xv, input)
        } else {
            xv.clone()
        };
        let want = conv2d_f64(&xu, &wv, b, up, [co, 3, 3], 1, 1);
        check(&format!("{what} vs f64"), &got, &want, TOL_F32);
        let direct = conv::conv2d(&xv, &wv, b, p);
        check(&format!("{what} vs direct"), &got, &direct, TOL_F32);
    }
}

/// Which convolutions go through Winograd: SDXL's 3×3 layers with guidance's two rows
/// from the 32² level up (and the VAE's), not the 16² level, nor few channels, nor other
/// kernels, strides, paddings or upsamplings; and the dispatch gives its result.
#[test]
fn winograd_dispatch() {
    use super::{conv, winograd};
    let p = |input, out_channels| conv::Params {
        input,
        out_channels,
        kernel: [3, 3],
        stride: 1,
        padding: 1,
        upsample: 1,
    };
    let unet_32 = p([2, 640, 32, 32], 640);
    assert!(winograd::applies(&unet_32));
    assert!(winograd::applies(&p([2, 320, 64, 64], 320)));
    assert!(winograd::applies(&conv::Params {
        upsample: 2,
        ..p([2, 1280, 16, 16], 1280)
    }));
    assert!(winograd::applies(&p([1, 512, 64, 64], 512)));
    assert!(!winograd::applies(&p([2, 1280, 16, 16], 1280)));
    assert!(!winograd::applies(&p([1, 4, 64, 64], 512)));
    assert!(!winograd::applies(&p([1, 320, 64, 64], 4)));
    for other in [
        conv::Params {
            stride: 2,
            ..unet_32
        },
        conv::Params {
            padding: 0,
            ..unet_32
        },
        conv::Params {
            kernel: [1, 1],
            ..unet_32
        },
        conv::Params {
            upsample: 3,
            ..unet_32
        },
    ] {
        assert!(
            !winograd::fits(&other) && !winograd::applies(&other),
            "{other:?}"
        );
    }
    // Through `fused_conv2d`: a layer the dispatch sends to Winograd, against f64.
    kernels_on();
    let (input, co) = ([1, 32, 48, 44], 32);
    assert!(winograd::applies(&p(input, co)));
    let xv = data(input.iter().product(), 0.4, 1.0, 0.0);
    let wv = data(co * 32 * 9, 1.4, 0.2, 0.0);
    let got = Flex::fused_conv2d(
        tensor(&xv, input, DType::F32),
        tensor(&wv, [co, 32, 3, 3], DType::F32),
        None,
        1,
        1,
    );
    let want = conv2d_f64(&xv, &wv, None, input, [co, 3, 3], 1, 1);
    check(
        "fused_conv2d through Winograd vs f64",
        &values(got),
        &want,
        TOL_F32,
    );
}

/// A strided view as input (the kernel makes it contiguous) and half precision (Burn's
/// convolution) give what Burn gives.
#[test]
fn conv_views_and_half_precision() {
    let x = tensor(
        &data(2 * 6 * 8 * 5, 0.5, 1.0, 0.0),
        [2, 6, 5, 8],
        DType::F32,
    )
    .swap_dims(2, 3);
    let w = tensor(&data(4 * 6 * 9, 1.1, 0.2, 0.0), [4, 6, 3, 3], DType::F32);
    let got = Flex::fused_conv2d(x.clone(), w.clone(), None, 1, 1);
    let want = plain::conv2d(x.clone(), w.clone(), None, 1, 1);
    check(
        "conv of a transposed view",
        &values(got),
        &values(want),
        TOL_F32,
    );
    let (xh, wh) = (x.cast(DType::F16), w.cast(DType::F16));
    let got = Flex::fused_conv2d(xh.clone(), wh.clone(), None, 1, 1);
    assert_eq!(got.dtype(), DType::F16);
    let want = plain::conv2d(xh, wh, None, 1, 1);
    assert_eq!(
        values(got),
        values(want),
        "half precision runs Burn's convolution"
    );
}

// ---------------------------------------------------------------------------------
// linear

/// `x·W + b` in f64 on the host.
fn linear_f64(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    rows: usize,
    [i, o]: [usize; 2],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * o);
    for r in 0..rows {
        for c in 0..o {
            let mut acc = b.map_or(0.0, |b| b[c] as f64);
            for k in 0..i {
                acc += x[r * i + k] as f64 * w[k * o + c] as f64;
            }
            out.push(acc as f32);
        }
    }
    out
}

#[test]
fn linear_shapes() {
    kernels_on();
    // Rows of several batch entries as one GEMM, below and above the threshold where
    // GEMM splits across threads; with and without bias; the weight as stored and as a
    // transposed view of a PyTorch-layout `[out, in]` tensor.
    for (batch, rows, i, o, bias) in [
        ([2usize, 3usize], 5usize, 7usize, 9usize, true),
        ([1, 1], 1, 16, 4, false),
        ([2, 1], 64, 96, 160, true),
        ([3, 2], 40, 130, 70, false),
        // Enough work to split the columns across threads, the last block narrower.
        ([2, 2], 50, 100, 300, true),
        // An output large enough for the bias to be filled by parallel tasks, whose
        // rows do not divide the task size (the last task shorter).
        ([2, 1], 700, 8, 97, true),
    ] {
        let n = batch[0] * batch[1] * rows;
        let xv = data(n * i, 0.4, 1.0, 0.1);
        let wv = data(i * o, 1.3, 0.2, 0.0);
        let bv = data(o, 2.1, 0.5, 0.0);
        let want = linear_f64(&xv, &wv, bias.then_some(&bv[..]), n, [i, o]);
        let x = tensor(&xv, [batch[0], batch[1], rows, i], DType::F32);
        let b = bias.then(|| tensor(&bv, [o], DType::F32));
        let w = tensor(&wv, [i, o], DType::F32);
        // The same matrix stored `[o, i]` and viewed transposed.
        let wt: Vec<f32> = (0..o * i).map(|j| wv[(j % i) * o + j / i]).collect();
        let w_view = tensor(&wt, [o, i], DType::F32).transpose();
        for (what, w) in [("stored", w), ("transposed view", w_view)] {
            let what = format!("linear {batch:?}×{rows}×{i} → {o}, weight {what}");
            let got = Flex::fused_linear(x.clone(), w.clone(), b.clone());
            assert_eq!(got.dims(), [batch[0], batch[1], rows, o], "{what}: shape");
            let burn = plain::linear(x.clone(), w, b.clone());
            let got = values(got);
            check(&format!("{what} vs f64"), &got, &want, TOL_F32);
            check(&format!("{what} vs Burn"), &got, &values(burn), TOL_F32);
        }
    }
    // Half rows as GEGLU leaves them (read through their row stride, no copy).
    let x = tensor(&data(2 * 3 * 8, 0.6, 1.0, 0.0), [2, 3, 8], DType::F32).narrow(2, 0, 4);
    let w = tensor(&data(4 * 5, 1.2, 0.3, 0.0), [4, 5], DType::F32);
    let b = tensor(&data(5, 0.8, 0.3, 0.0), [5], DType::F32);
    let got = Flex::fused_linear(x.clone(), w.clone(), Some(b.clone()));
    check(
        "linear of half rows",
        &values(got),
        &values(plain::linear(x, w, Some(b))),
        TOL_F32,
    );
    // A transposed view as input (made contiguous first) and a 2-d input.
    let x = tensor(&data(6 * 4, 0.9, 1.0, 0.0), [1, 6, 4], DType::F32).swap_dims(1, 2);
    let w = tensor(&data(6 * 3, 1.9, 0.3, 0.0), [6, 3], DType::F32);
    let got = Flex::fused_linear(x.clone(), w.clone(), None);
    check(
        "linear of a transposed view",
        &values(got),
        &values(plain::linear(x, w.clone(), None)),
        TOL_F32,
    );
    let x2 = tensor(&data(5 * 6, 0.2, 1.0, 0.0), [5, 6], DType::F32);
    let got = Flex::fused_linear(x2.clone(), w.clone(), None);
    check(
        "linear 2-d",
        &values(got),
        &values(plain::linear(x2, w, None)),
        TOL_F32,
    );
}

#[test]
fn panel_layout() {
    // Element (i, j) of the weight lands where the kernel reads it: panel j / 64 holds
    // its i rows of 64 in turn, the last (narrower) panel rows of the remaining columns.
    for (k, n) in [
        (3usize, 200usize),
        (5, 64),
        (2, 40),
        (130, 128),
        (1, 90),
        (4, 0),
    ] {
        let wv: Vec<f32> = (0..k * n).map(|v| v as f32).collect();
        let packed = values(plain::to_panels(tensor(&wv, [k, n], DType::F32)));
        let full = n / 64 * 64;
        for i in 0..k {
            for j in 0..n {
                let at = if j < full {
                    (j / 64) * k * 64 + i * 64 + j % 64
                } else {
                    full * k + i * (n - full) + (j - full)
                };
                assert_eq!(packed[at], wv[i * n + j], "[{k}, {n}] ({i}, {j})");
            }
        }
        let back = plain::from_panels(tensor(&packed, [k, n], DType::F32));
        assert_eq!(values(back), wv, "[{k}, {n}] back");
    }
}

#[test]
fn linear_panels_shapes() {
    kernels_on();
    assert!(
        Flex::linear_panels(DType::F32) == panels::available(),
        "panels on this CPU exactly when the kernel runs"
    );
    assert!(!Flex::linear_panels(DType::F16), "no panels in f16");
    // Full panels, a narrower last one, only a narrow one; row counts that leave every
    // partial tile (1–5 rows); `k` past one block of 128 panel rows and not a multiple
    // of it; enough work to split the panels across threads with a short last run.
    for (batch, i, o, bias) in [
        ([1usize, 77usize], 96usize, 200usize, true),
        ([2, 3], 7, 64, false),
        ([1, 1], 300, 130, true),
        ([2, 5], 33, 32, true),
        ([1, 4], 129, 64, false),
        ([2, 77], 257, 1000, true),
        ([1, 2], 64, 1, true),
    ] {
        let n = batch[0] * batch[1];
        let xv = data(n * i, 0.4, 1.0, 0.1);
        let wv = data(i * o, 1.3, 0.2, 0.0);
        let bv = data(o, 2.1, 0.5, 0.0);
        let want = linear_f64(&xv, &wv, bias.then_some(&bv[..]), n, [i, o]);
        let x = tensor(&xv, [batch[0], batch[1], i], DType::F32);
        let b = bias.then(|| tensor(&bv, [o], DType::F32));
        let w = plain::to_panels(tensor(&wv, [i, o], DType::F32));
        let what = format!("panel linear {batch:?}×{i} → {o}");
        let got = Flex::fused_linear_panels(x.clone(), w.clone(), b.clone());
        assert_eq!(got.dims(), [batch[0], batch[1], o], "{what}: shape");
        check(&what, &values(got), &want, TOL_F32);
        // The fallback every other backend runs.
        let plain = plain::linear_rows(x, plain::from_panels(w), b);
        check(&format!("{what}, plain"), &values(plain), &want, TOL_F32);
    }
    // Rows through a stride (GEGLU's half rows) and a transposed view (copied first).
    let w = plain::to_panels(tensor(&data(4 * 70, 1.2, 0.3, 0.0), [4, 70], DType::F32));
    let x = tensor(&data(2 * 3 * 8, 0.6, 1.0, 0.0), [2, 3, 8], DType::F32).narrow(2, 0, 4);
    let xt = tensor(&data(4 * 6, 0.9, 1.0, 0.0), [1, 4, 6], DType::F32).swap_dims(1, 2);
    for (what, x) in [("half rows", x), ("transposed view", xt)] {
        let got = Flex::fused_linear_panels(x.clone(), w.clone(), None);
        let want = plain::linear(x, plain::from_panels(w.clone()), None);
        check(
            &format!("panel linear of {what}"),
            &values(got),
            &values(want),
            TOL_F32,
        );
    }
}

// ---------------------------------------------------------------------------------
// layer norm

fn layer_norm_f64(x: &[f32], dim: usize, w: &[f32], b: &[f32], eps: f64) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(&v, (&w, &b))| ((v as f64 - mean) * rstd * w as f64 + b as f64) as f32)
        })
        .collect()
}

#[test]
fn layer_norm_shapes_and_dtypes() {
    kernels_on();
    // Odd widths, SDXL's widths with enough rows for several tasks, a large mean next
    // to a small spread, and half precision (f32 statistics, one rounding at the end).
    for (dtype, rows, dim, shift) in [
        (DType::F32, 3usize, 5usize, 0.0f32),
        (DType::F32, 7, 1000, 0.0),
        (DType::F32, 130, 640, 0.0),
        (DType::F32, 9, 1280, 300.0),
        (DType::F16, 33, 768, 0.0),
        (DType::BF16, 12, 2048, 1.0),
    ] {
        let xv = data(rows * dim, 0.7, 1.5, shift);
        let wv = data(dim, 1.4, 0.5, 1.0);
        let bv = data(dim, 2.6, 0.2, 0.0);
        let x = tensor(&xv, [1, rows, dim], dtype);
        let (w, b) = (tensor(&wv, [dim], dtype), tensor(&bv, [dim], dtype));
        // What the kernel sees after the inputs are stored in `dtype`.
        let (xs, ws, bs) = (values(x.clone()), values(w.clone()), values(b.clone()));
        let want = layer_norm_f64(&xs, dim, &ws, &bs, 1e-5);
        let got = both_ownerships(x.clone(), |x| {
            Flex::fused_layer_norm(x, w.clone(), b.clone(), 1e-5)
        });
        assert_eq!(got.dtype(), dtype);
        let what = format!("layer norm {rows}×{dim} {dtype:?}");
        let got = values(got);
        check(&format!("{what} vs f64"), &got, &want, tolerance(dtype));
        // The plain composition loses digits to a large mean (2e-5 at mean 300), so it
        // is compared only where it is accurate itself.
        if shift == 0.0 {
            let plain = values(plain::layer_norm(x, w, b, 1e-5));
            check(&format!("{what} vs plain"), &got, &plain, tolerance(dtype));
        }
    }
}

// ---------------------------------------------------------------------------------
// the model pool

#[test]
fn on_pool_passes_from_many_threads() {
    // Passes from several threads at once (as parallel tests make them), each with
    // nested parallel work: all finish, with the right results, whichever of them has
    // the spinning workers and wherever their tasks run.
    let sums: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                s.spawn(move || {
                    (0..40u64)
                        .map(|i| {
                            Flex::on_pool(|| {
                                use rayon::prelude::*;
                                (0..20_000u64)
                                    .into_par_iter()
                                    .map(|v| {
                                        let (a, b) = rayon::join(|| v * t, || v + i);
                                        a + b
                                    })
                                    .sum::<u64>()
                            })
                        })
                        .sum()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let n = 20_000u64;
    for (t, got) in sums.iter().enumerate() {
        let want: u64 = (0..40u64)
            .map(|i| (t as u64) * n * (n - 1) / 2 + n * (n - 1) / 2 + n * i)
            .sum();
        assert_eq!(*got, want, "thread {t}");
    }
}

#[test]
fn on_pool_survives_a_panicking_pass() {
    // The spinning workers stop when the pass unwinds, and the next pass gets them.
    let caught = std::panic::catch_unwind(|| Flex::on_pool(|| -> u32 { panic!("pass fails") }));
    assert!(caught.is_err(), "the panic reaches the caller");
    let got = Flex::on_pool(|| {
        use rayon::prelude::*;
        (0..1000u32).into_par_iter().sum::<u32>()
    });
    assert_eq!(got, 999 * 1000 / 2);
}
