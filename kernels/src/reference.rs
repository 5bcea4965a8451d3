//! Host references for the kernels' tests (feature `test-utils`; always in this crate's
//! own tests): deterministic test data and ops computed in f64, shared by the unit tests
//! of `src/cpu/` and hypergen's suite (`tests/suite/parity/kernels.rs`).

/// Deterministic, irregular test data: a scaled, shifted mix of sines (no RNG needed).
pub fn data(len: usize, seed: f32, scale: f32, shift: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = i as f32 * 0.618_034 + seed;
            shift + scale * ((x * 12.9898).sin() * 0.7 + (x * 78.233).cos() * 0.3)
        })
        .collect()
}

/// GroupNorm (ε = 1e-5) of a `[n, c, l]` tensor on the host in f64, with an optional
/// per-channel affine `(gamma, beta)` and SiLU: the reference when a group's mean is
/// large and f32 summation order matters.
pub fn group_norm_f64(
    x: &[f32],
    [n, c, l]: [usize; 3],
    groups: usize,
    affine: Option<(&[f32], &[f32])>,
    silu: bool,
) -> Vec<f32> {
    let group_len = c / groups * l;
    let mut out = vec![0f32; x.len()];
    for (g, chunk) in x.chunks(group_len).enumerate().take(n * groups) {
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
        let var = chunk
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / group_len as f64;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        for (i, &v) in chunk.iter().enumerate() {
            let at = g * group_len + i;
            let ch = (at / l) % c;
            let mut y = (v as f64 - mean) * rstd;
            if let Some((gamma, beta)) = affine {
                y = y * gamma[ch] as f64 + beta[ch] as f64;
            }
            if silu {
                y /= 1.0 + (-y).exp();
            }
            out[at] = y as f32;
        }
    }
    out
}
