//! Seedable Gaussian noise that reproduces PyTorch's CPU generator.
//!
//! diffusers draws its initial latents and ancestral noise with
//! `torch.Generator("cpu").manual_seed(seed)` and `torch.randn(shape, generator=g)`. The
//! [`Generator`] here replays that stream on the host, so one seed gives the same noise as
//! diffusers, and the same noise on every Burn backend and every machine.
//!
//! # Algorithm
//!
//! * **Engine.** A 32-bit Mersenne Twister (MT19937). `manual_seed(seed)` keeps the low 32
//!   bits of the seed as `state[0]` and fills the rest with the reference recurrence
//!   `state[i] = 1812433253 * (state[i-1] ^ (state[i-1] >> 30)) + i`.
//! * **Uniforms.** A float32 uniform takes one 32-bit draw and keeps its low 24 bits:
//!   `u = (x & 0xFFFFFF) * 2^-24`, in `[0, 1)`. A float64 uniform takes two draws `hi`, `lo`,
//!   forms `hi << 32 | lo` and keeps its low 53 bits, times `2^-53`.
//! * **Vectorised path** (`numel >= 16`, what latents use). First every element is filled
//!   with a float32 uniform, in order. Then each block of 16 is transformed in place by the
//!   Box–Muller transform pairing element `j` with `j + 8` (`j < 8`): with `u1 = 1 - d[j]`,
//!   `u2 = d[j + 8]`, `r = sqrt(-2 ln u1)`, `θ = 2π u2`, it writes `d[j] = r cos θ` and
//!   `d[j + 8] = r sin θ`, in float32 arithmetic with `2π` rounded to float32. When
//!   `numel % 16 != 0`, the last 16 elements are drawn *again* (16 fresh uniforms
//!   overwrite them, overlapping the previous block) and transformed once more, so
//!   `numel` is not rounded up.
//! * **Scalar path** (`numel < 16`). Each value is a float64 normal from two float64
//!   uniforms `u1`, `u2`: `r = sqrt(-2 ln(1 - u2))` (as `ln_1p(-u2)`), `θ = 2π u1`, returning
//!   `r cos θ` and caching `r sin θ` for the next scalar draw (the cache lives in the
//!   generator, like torch's, and is cleared by seeding); the value is then rounded to f32.
//!
//! # Agreement with torch
//!
//! * **Vectorised path:** bit-exact with torch on x86-64, the platform diffusers results
//!   are usually produced on. torch's x86 builds (AVX2 and AVX-512 capabilities) evaluate
//!   `ln`, `sin` and `cos` with the float32 Cephes kernels of `avx_mathfun.h`, compiled
//!   with fused multiply-adds; the private `cephes` module replays those kernels operation for operation
//!   with `f32::mul_add`, which is fused on every platform, so this generator gives the
//!   same bits everywhere. Checked against torch 2.15 on 137k values (all identical).
//!   torch builds without AVX2 (its `default` capability, ARM) call libm's float
//!   functions instead and differ from this by a few float32 ulps.
//! * **Scalar path:** bit-exact wherever libm's float64 `log1p`, `sin` and `cos` are
//!   correctly rounded for the values at hand (glibc's are); the f32 result absorbs the
//!   rest.
//!
//! Noise is always produced in float32; [`Generator::randn_tensor`] casts it to the
//! requested dtype (torch would draw half-precision noise with a different recipe).

use crate::FusedOps;
use burn::tensor::{DType, Tensor, TensorData};

/// Length of the Mersenne Twister state, in 32-bit words.
const N: usize = 624;
/// The twist's middle offset.
const M: usize = 397;

/// A seeded stream of uniform and normal numbers identical to
/// `torch.Generator("cpu").manual_seed(seed)`. See the [module docs](self).
#[derive(Clone)]
pub struct Generator {
    state: [u32; N],
    index: usize,
    /// The second value of the scalar path's last Box–Muller pair, not yet returned.
    next_normal: Option<f64>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// A generator in the state `torch.Generator("cpu").manual_seed(seed)` leaves.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        // torch's mt19937 keeps only the low 32 bits of the seed.
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: N,
            next_normal: None,
        }
    }

    /// The next raw 32-bit output of MT19937.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// A float32 uniform in `[0, 1)` from one draw, as torch makes them.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A float64 uniform in `[0, 1)` from two draws, as torch makes them.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        ((hi << 32 | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One standard normal value from the scalar path (torch's `normal_distribution<double>`).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Standard normal float32 values for a tensor of `shape` (row-major), exactly the
    /// stream `torch.randn(shape, generator=g, dtype=torch.float32)` gives.
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let numel: usize = shape.iter().product();
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !numel.is_multiple_of(16) {
            // torch redraws the trailing 16 values rather than padding the last block.
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// [`randn`](Self::randn) as a tensor on `device`, cast to `dtype` (drawn in float32).
    pub fn randn_tensor<B: FusedOps, const D: usize>(
        &mut self,
        shape: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Tensor<B, D> {
        let data = TensorData::new(self.randn(&shape), shape);
        let t = Tensor::<B, D>::from_data(data, (device, DType::F32));
        if dtype == DType::F32 {
            t
        } else {
            t.cast(dtype)
        }
    }
}

/// torch's `normal_fill_16_AVX2`: Box–Muller on 16 uniforms, pairing `j` with `j + 8`.
fn box_muller_16(d: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0f32 * cephes::ln(u1)).sqrt();
        let (sin, cos) = cephes::sin_cos(two_pi * u2);
        d[j] = radius * cos;
        d[j + 8] = radius * sin;
    }
}

/// The float32 Cephes approximations of `ln`, `sin` and `cos` that torch's x86 kernel
/// evaluates (`log256_ps`, `sincos256_ps`), operation for operation, including the fused
/// multiply-adds the compiler forms from them. `f32::mul_add` is always fused, so the
/// results are the same on every platform.
mod cephes {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const LOG_P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_84e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    const LOG_Q1: f32 = -2.121_944_4e-4;
    const LOG_Q2: f32 = 0.693_359_4;
    const FOUR_OVER_PI: f32 = 1.273_239_5;
    const DP1: f32 = 0.785_156_25;
    const DP2: f32 = 2.418_756_5e-4;
    const DP3: f32 = 3.774_895e-8;
    const SIN_P: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];
    const COS_P: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];

    /// Natural logarithm of a positive normal float (Box–Muller's `u1` is in `[2^-24, 1]`).
    pub fn ln(v: f32) -> f32 {
        let bits = v.to_bits();
        // v = m * 2^e with m in [0.5, 1).
        let mut e = ((bits >> 23) as i32 - 127) as f32 + 1.0;
        let m = f32::from_bits((bits & !0x7f80_0000) | 0x3f00_0000);
        let x = if m < SQRT_HALF {
            e -= 1.0;
            (m - 1.0) + m
        } else {
            m - 1.0
        };
        let z = x * x;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(x, p);
        }
        y *= x;
        y = y.mul_add(z, e * LOG_Q1);
        y -= z * 0.5;
        e.mul_add(LOG_Q2, x + y)
    }

    /// `(sin v, cos v)` by octant reduction and two minimax polynomials.
    pub fn sin_cos(v: f32) -> (f32, f32) {
        let mut sin_negative = v.is_sign_negative();
        let mut x = v.abs();
        // Octant index, rounded up to even (truncating conversion, as cvttps does).
        let j = ((x * FOUR_OVER_PI) as i32 + 1) & !1;
        let y = j as f32;
        sin_negative ^= j & 4 != 0;
        let cos_negative = (j - 2) & 4 == 0;
        let sin_poly_for_sin = j & 2 == 0;
        // Extended-precision reduction: x - y * pi/4 in three parts.
        x = y.mul_add(-DP1, x);
        x = y.mul_add(-DP2, x);
        x = y.mul_add(-DP3, x);
        let z = x * x;
        let mut c = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]) * z;
        c = c.mul_add(z, -(z * 0.5)) + 1.0;
        let s = (SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]) * z).mul_add(x, x);
        let (s, c) = if sin_poly_for_sin { (s, c) } else { (c, s) };
        (
            if sin_negative { -s } else { s },
            if cos_negative { -c } else { c },
        )
    }
}

#[cfg(test)]
mod tests {
    //! Expected values were printed by torch 2.15 on x86-64:
    //! `g = torch.Generator("cpu").manual_seed(seed); torch.randn(shape, generator=g)`.
    //! Agreement is bit-exact, so the comparisons are exact.

    use super::Generator;

    fn check(got: &[f32], want: &[(usize, f32)]) {
        for &(i, w) in want {
            assert_eq!(got[i], w, "element {i}: got {}, torch gives {w}", got[i]);
        }
    }

    #[test]
    fn mt19937_reference_output() {
        // The 10000th output of std::mt19937 seeded with 5489 is 4123659995 (C++11 standard).
        let mut g = Generator::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn vectorised_latent_shape_seed0() {
        let got = Generator::new(0).randn(&[1, 4, 16, 16]);
        assert_eq!(got.len(), 1024);
        check(
            &got,
            &[
                (0, -1.1258398),
                (1, -1.1523602),
                (2, -0.25057858),
                (7, -2.1152194),
                (8, 0.32227492),
                (9, -1.2633348),
                (15, -0.24727815),
                (16, -1.3526537),
                (500, -0.16421619),
                (1021, 0.5374267),
                (1022, 1.082613),
                (1023, -1.7104684),
            ],
        );
    }

    #[test]
    fn vectorised_crosses_twister_refills() {
        let got = Generator::new(123).randn(&[1, 4, 128, 128]);
        check(
            &got,
            &[
                (0, 0.3373702),
                (1, -0.17777722),
                (623, 0.22026236),
                (624, -0.74650884),
                (625, 0.22302277),
                (40000, 0.25934765),
                (65535, -1.9068499),
            ],
        );
    }

    #[test]
    fn vectorised_with_redrawn_tail() {
        let got = Generator::new(42).randn(&[20]);
        assert_eq!(
            got,
            [
                1.9269153,
                1.4872841,
                0.9007172,
                -2.105521,
                -0.75813115,
                1.0783176,
                0.80080056,
                1.6806206,
                0.3558599,
                -0.686623,
                -0.49335635,
                0.24148779,
                -0.23162432,
                0.04175949,
                -0.2515753,
                0.8598585,
                -0.30972677,
                -0.3957105,
                0.80340934,
                -0.6215954
            ]
        );
        // Exactly 16 (one block, no redraw) and 17 (a full redraw of the last 16).
        check(
            &Generator::new(1).randn(&[16]),
            &[(0, -1.5255959), (8, -0.7121446), (15, 0.4676355)],
        );
        check(
            &Generator::new(1).randn(&[17]),
            &[(0, -1.5255959), (1, -1.1607615), (16, -0.7984398)],
        );
    }

    #[test]
    fn scalar_path() {
        assert_eq!(
            Generator::new(42).randn(&[5]),
            [0.33669037, 0.1288094, 0.23446237, 0.23033303, -1.1228564]
        );
        // Seeds keep only their low 32 bits, as torch's mt19937 does.
        assert_eq!(
            Generator::new((1u64 << 40) + 5).randn(&[3]),
            [-0.48678076, -0.6038216, -0.55809623]
        );
    }

    #[test]
    fn scalar_cache_carries_across_calls() {
        // torch: randn(5), randn(3), randn(20), randn(2) from one seed-7 generator. The odd
        // count leaves a cached sine value for the next scalar draw; the vectorised draw
        // leaves the cache alone.
        let mut g = Generator::new(7);
        assert_eq!(
            g.randn(&[5]),
            [-0.1467951, 0.7861413, 0.94682163, -1.114344, 1.6907902]
        );
        assert_eq!(g.randn(&[3]), [-0.8948279, -0.35562503, 1.2323858]);
        check(
            &g.randn(&[20]),
            &[(0, -1.5826646), (7, -0.6056803), (19, -1.3677397)],
        );
        assert_eq!(g.randn(&[2]), [1.8149728, -0.6028483]);
    }

    #[test]
    fn empty_shape_gives_nothing() {
        assert!(Generator::new(0).randn(&[0, 4]).is_empty());
    }
}
