//! Vectorisable f32 `exp` and `erf`, and the instruction-set dispatch of our hot loops.
//!
//! The functions here are plain arithmetic on `f32` and its bits, with selects instead
//! of branches, so that LLVM vectorises the loops that inline them. The crate is built
//! for baseline x86-64 (SSE2), so each hot loop is compiled three times by
//! [`multiversion!`]: for AVX-512, for AVX2 + FMA, and for the baseline, and picked at
//! run time. `FMA` selects fused multiply-adds, which the baseline would have to emulate
//! in software (a libm call per operation).

/// Which compiled variant of the hot loops this CPU runs (each enables exactly the
/// features [`level`] checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// AVX-512 F/BW/DQ/VL with AVX2 and FMA (x86-64-v4).
    V4,
    /// AVX2 with FMA (x86-64-v3).
    V3,
    /// Whatever the build targets (SSE2 on x86-64; NEON on aarch64).
    Base,
}

/// The best [`Level`] of this CPU, detected once.
pub(crate) fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let v4 = v3
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            if v4 {
                Level::V4
            } else if v3 {
                Level::V3
            } else {
                Level::Base
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Base
    }
}

/// Whether the baseline build has hardware FMA (always on aarch64).
pub(crate) const BASE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// Defines `fn $name(args) -> ret` that runs `$imp::<FMA>(args)` compiled for the best
/// instruction set of the CPU ([`level`]). `$imp` must be `#[inline(always)]` so that it
/// is compiled into each variant.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    $imp::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    $imp::<true>($($arg),*)
                }
                match $crate::cpu::math::level() {
                    // SAFETY: `level` detected these features on this CPU.
                    $crate::cpu::math::Level::V4 => unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::math::Level::V3 => unsafe { v3($($arg),*) },
                    $crate::cpu::math::Level::Base => {
                        $imp::<{ $crate::cpu::math::BASE_FMA }>($($arg),*)
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                $imp::<{ $crate::cpu::math::BASE_FMA }>($($arg),*)
            }
        }
    };
}
pub(crate) use multiversion;

/// Lanes of the explicit accumulators in reductions: four AVX-512 vectors of f32 (eight
/// AVX2 ones), enough independent additions in flight to hide their latency. Strict
/// IEEE addition is not associative, so LLVM vectorises a sum only when it is written
/// as independent lanes.
pub(crate) const LANES: usize = 64;

/// `a * b + c`, fused when `FMA` (one rounding; needs hardware FMA to be fast).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `x` if `x` is at least `lo`, else `lo`; NaN stays NaN (unlike `f32::max`).
#[inline(always)]
fn at_least(x: f32, lo: f32) -> f32 {
    if x < lo {
        lo
    } else {
        x
    }
}

/// `x` if `x` is at most `hi`, else `hi`; NaN stays NaN (unlike `f32::min`).
#[inline(always)]
fn at_most(x: f32, hi: f32) -> f32 {
    if x > hi {
        hi
    } else {
        x
    }
}

/// `2^n` for `n` in `-126..=127`, built from its exponent bits.
#[inline(always)]
fn pow2i(n: i32) -> f32 {
    f32::from_bits((n.wrapping_add(127) as u32).wrapping_shl(23))
}

/// Below this `exp` returns 0 (`e^x < 2.7e-38`, about `2^-125`): flushing the few
/// subnormal results costs one select where gradual underflow would cost a second
/// scaling, and nothing here (softmax, SiLU) can tell them from 0.
const EXP_FLUSH: f32 = -86.5;

/// `e^x` in f32, relative error below 1.5e-7 where the result is at least `2^-125`
/// (the tests check it against `f64::exp` on a dense grid).
///
/// Cody–Waite reduction `x = n·ln2 + r`, `|r| ≤ ln2/2` (ln2 split in two so `n·ln2` is
/// exact), `e^r = 1 + r·q(r)` with q of degree 5 (a near-minimax fit made for this
/// crate, 2e-9 in exact arithmetic), then `2^n` put in the exponent bits. Above
/// ln(f32::MAX) it gives `+inf`, below [`EXP_FLUSH`] `0`; NaN propagates, `±inf` give
/// `inf` and `0`. About 21 vector operations, no division, no table.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    // Clamping keeps `n` in [-125, 128] (NaN-preserving selects, see `at_least`).
    let xc = at_most(at_least(x, EXP_FLUSH), 89.0);
    // Round x·log2(e) to the nearest integer by adding 1.5·2²³: the integer appears in
    // the low mantissa bits (no float-to-int conversion, whose saturation costs more).
    const MAGIC: f32 = 12_582_912.0;
    let t = madd::<FMA>(xc, std::f32::consts::LOG2_E, MAGIC);
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let nf = t - MAGIC;
    // Cody–Waite: C1 has 9 significant bits, so `nf * C1` is exact.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let r = madd::<FMA>(nf, -C2, madd::<FMA>(nf, -C1, xc));
    let mut q = 1.384_365_4e-3;
    q = madd::<FMA>(q, r, 8.374_155_5e-3);
    q = madd::<FMA>(q, r, 4.166_8e-2);
    q = madd::<FMA>(q, r, 1.666_643_2e-1);
    q = madd::<FMA>(q, r, 4.999_999_4e-1);
    q = madd::<FMA>(q, r, 1.0);
    let y = madd::<FMA>(q, r, 1.0);
    // e^x = (2·y)·2^(n−1): `n − 1` stays in the normal exponents for n in [-125, 128],
    // so results up to f32::MAX round once, and beyond it overflow to inf.
    let e = (y + y) * pow2i(n.wrapping_sub(1));
    if x < EXP_FLUSH {
        0.0
    } else {
        e
    }
}

/// The error function in f32, absolute error below 1e-7 (checked against libm's f64
/// `erf` by the tests; near ±1 that is two ulp).
///
/// Two polynomials, both evaluated and one selected (branch-free, so it vectorises):
/// for `|x| < 1.1`, `erf(x) = x + x·P(x²)` (P of degree 7: the leading `x` is added
/// last, so P's rounding errors are scaled down by the small correction it makes); for
/// `1.1 ≤ |x| < 3.84`, `erf(x) = 1 − E(u)` with E of degree 12 in
/// `u = (|x| − 2.47)/1.37 ∈ [-1, 1]` (E approximates `erfc`, at most 0.12 there, so
/// its rounding errors are small next to one ulp of the result); beyond that `±1`, where
/// `erf` is within 7e-8 of 1. Near-minimax fits (Lawson's algorithm) made for this
/// crate. Odd symmetry is exact, results never leave `[-1, 1]`, relative error near 0
/// is that of f32 down to subnormal `x`, NaN propagates, `±inf` give `±1`.
#[inline(always)]
pub(crate) fn erf<const FMA: bool>(x: f32) -> f32 {
    const SPLIT: f32 = 1.1;
    const SATURATE: f32 = 3.84;
    let a = x.abs();
    // Clamped (NaN-preserving) so that the branch not taken stays finite.
    let a = at_most(a, SATURATE);
    let a2 = a * a;
    let mut p = -8.806_802e-6;
    p = madd::<FMA>(p, a2, 1.095_460_7e-4);
    p = madd::<FMA>(p, a2, -8.439_854e-4);
    p = madd::<FMA>(p, a2, 5.217_921_5e-3);
    p = madd::<FMA>(p, a2, -2.686_431e-2);
    p = madd::<FMA>(p, a2, 1.128_376_35e-1);
    p = madd::<FMA>(p, a2, -3.761_263_8e-1);
    p = madd::<FMA>(p, a2, 1.283_791_7e-1);
    let small = madd::<FMA>(a, p, a);
    let u = (a - 2.47) * 7.299_27e-1;
    let mut e = 4.353_508_4e-4;
    e = madd::<FMA>(e, u, -7.679_681e-4);
    e = madd::<FMA>(e, u, -1.375_060_6e-3);
    e = madd::<FMA>(e, u, 5.017_335_5e-3);
    e = madd::<FMA>(e, u, -4.401_002e-3);
    e = madd::<FMA>(e, u, -4.440_128_3e-3);
    e = madd::<FMA>(e, u, 1.931_359_4e-2);
    e = madd::<FMA>(e, u, -3.196_133_3e-2);
    e = madd::<FMA>(e, u, 3.372_393e-2);
    e = madd::<FMA>(e, u, -2.428_137_7e-2);
    e = madd::<FMA>(e, u, 1.172_325_7e-2);
    e = madd::<FMA>(e, u, -3.463_950_5e-3);
    e = madd::<FMA>(e, u, 4.774_224e-4);
    let large = 1.0 - e;
    let y = if a < SPLIT { small } else { large };
    let y = if a >= SATURATE { 1.0 } else { y };
    at_most(y, 1.0).copysign(x)
}

/// Exact (erf) GELU: `x·(1 + erf(x/√2))/2`.
#[inline(always)]
pub(crate) fn gelu<const FMA: bool>(x: f32) -> f32 {
    let half_x = 0.5 * x;
    madd::<FMA>(
        half_x,
        erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2),
        half_x,
    )
}

/// SiLU: `x·sigmoid(x) = x / (1 + e^-x)`; 0 for large negative `x` (`e^-x` = inf).
#[inline(always)]
pub(crate) fn silu<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp::<FMA>(-x))
}

#[inline(always)]
fn exp_slice_imp<const FMA: bool>(xs: &mut [f32]) {
    for x in xs {
        *x = exp::<FMA>(*x);
    }
}

#[inline(always)]
fn erf_slice_imp<const FMA: bool>(xs: &mut [f32]) {
    for x in xs {
        *x = erf::<FMA>(*x);
    }
}

multiversion! {
    /// [`exp`] over a slice in place, on the dispatched instruction set (for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn exp_slice(xs: &mut [f32]) => exp_slice_imp
}

multiversion! {
    /// [`erf`] over a slice in place, on the dispatched instruction set (for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn erf_slice(xs: &mut [f32]) => erf_slice_imp
}
