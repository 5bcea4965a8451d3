//! Deterministic random weights for any module, generated on the host from a seed so
//! that the same seed gives the same model on every backend and machine.
//!
//! Scales follow PyTorch's defaults (uniform ±1/√fan_in for linear and convolution
//! weights and biases), norms start at the identity (γ = 1, β = 0), embeddings are
//! small: activations stay of order one through SDXL's depth, so a random model makes
//! finite, non-constant images and realistic work for benchmarks.

use crate::FusedOps;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor, TensorData};

/// Values generated per independently seeded chunk: chunks can be generated on any
/// number of threads and still give the same numbers.
const CHUNK: usize = 1 << 20;

/// Replaces every float parameter of `module` by seeded random values in `dtype`.
/// Lazy parameters are never initialised by Burn first, so no device memory or time is
/// spent on values that are thrown away. `stream` separates the components of one model
/// (the same seed gives different values to the UNet and the VAE).
pub fn randomize<B: FusedOps, M: Module<B>>(module: M, seed: u64, stream: u64, dtype: DType) -> M {
    let mut mapper = RandomMapper {
        seed: mix(seed ^ mix(stream.wrapping_add(0x5EED))),
        dtype,
        path: Vec::new(),
        count: 0,
        fan_in: 1,
    };
    module.map(&mut mapper)
}

struct RandomMapper {
    seed: u64,
    dtype: DType,
    /// (field name, type of the struct holding it), outermost first.
    path: Vec<(String, String)>,
    /// Parameters generated so far: each one's values come from its own sub-seed.
    count: u64,
    /// Fan-in of the last weight, for the bias that follows it in the same layer.
    fan_in: usize,
}

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// Uniform in ±bound.
    Uniform(f32),
    /// Every value the same.
    Constant(f32),
}

impl RandomMapper {
    fn init_for(&mut self, dims: &[usize]) -> Init {
        let (field, holder) = self
            .path
            .last()
            .map(|(f, h)| (f.as_str(), h.as_str()))
            .unwrap_or(("", ""));
        let bound = |fan_in: usize| 1.0 / (fan_in.max(1) as f32).sqrt();
        match (holder, field) {
            (_, "gamma") => Init::Constant(1.0),
            (_, "beta") => Init::Constant(0.0),
            // CLIP's initialiser range (0.02 standard deviation), as a uniform.
            ("Struct:Embedding", _) => Init::Uniform(0.02 * 3f32.sqrt()),
            // Burn stores linear weights as [in, out].
            ("Struct:Linear", "weight") => {
                self.fan_in = dims.first().copied().unwrap_or(1);
                Init::Uniform(bound(self.fan_in))
            }
            // [out, in / groups, kernel...].
            ("Struct:Conv2d", "weight") => {
                self.fan_in = dims.iter().skip(1).product();
                Init::Uniform(bound(self.fan_in))
            }
            (_, "bias") => Init::Uniform(bound(self.fan_in)),
            _ => Init::Uniform(bound(dims.last().copied().unwrap_or(1))),
        }
    }
}

impl<B: FusedOps> ModuleMapper<B> for RandomMapper {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let shape = param.lazy_shape();
        let device = param.lazy_device();
        let init = self.init_for(&shape.dims::<D>());
        let seed = mix(self.seed ^ mix(self.count));
        self.count += 1;
        let n = shape.num_elements();
        // Straight into the target type: no float32 copy of a float16 model in memory.
        let data = match self.dtype {
            DType::F16 => TensorData::new(generate(n, init, seed, half::f16::from_f32), shape),
            DType::BF16 => TensorData::new(generate(n, init, seed, half::bf16::from_f32), shape),
            DType::F32 => TensorData::new(generate(n, init, seed, |v| v), shape),
            other => TensorData::new(generate(n, init, seed, |v| v), shape).convert_dtype(other),
        };
        // The dtype must be named: without it Burn converts to the device's default float.
        let dtype = data.dtype;
        Param::initialized(param.id, Tensor::from_data(data, (&device, dtype)))
    }
}

/// `n` values of `init`, generated in parallel chunks with per-chunk seeds and stored
/// through `convert`.
fn generate<T: Copy + Default + Send>(
    n: usize,
    init: Init,
    seed: u64,
    convert: fn(f32) -> T,
) -> Vec<T> {
    let bound = match init {
        Init::Constant(c) => return vec![convert(c); n],
        Init::Uniform(b) => b,
    };
    let mut out = vec![T::default(); n];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(n.div_ceil(CHUNK))
        .max(1);
    let chunks: Vec<(usize, &mut [T])> = out.chunks_mut(CHUNK).enumerate().collect();
    let per_thread = chunks.len().div_ceil(threads);
    let mut groups: Vec<Vec<(usize, &mut [T])>> = Vec::new();
    let mut chunks = chunks.into_iter().peekable();
    while chunks.peek().is_some() {
        groups.push(chunks.by_ref().take(per_thread).collect());
    }
    let fill = |group: Vec<(usize, &mut [T])>| {
        for (index, chunk) in group {
            let mut state = mix(seed ^ mix(index as u64 + 1));
            for v in chunk.iter_mut() {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                // 24 random bits → [0, 1) → [-bound, bound).
                let u = (mix(state) >> 40) as f32 / (1u64 << 24) as f32;
                *v = convert((2.0 * u - 1.0) * bound);
            }
        }
    };
    if groups.len() == 1 {
        groups.into_iter().for_each(fill);
    } else {
        std::thread::scope(|s| {
            for group in groups {
                s.spawn(move || fill(group));
            }
        });
    }
    out
}

/// The number of float parameters of `module`, read from shapes alone: lazy parameters
/// stay uninitialised (Burn's `num_params` would allocate them).
pub fn lazy_num_params<B: FusedOps, M: Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: FusedOps> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_bounded_and_thread_independent() {
        let f = |v: f32| v;
        let a = generate(3 * CHUNK + 17, Init::Uniform(0.5), 7, f);
        let b = generate(3 * CHUNK + 17, Init::Uniform(0.5), 7, f);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        // The first chunk does not depend on how many chunks follow.
        let short = generate(CHUNK, Init::Uniform(0.5), 7, f);
        assert_eq!(&a[..CHUNK], &short[..]);
        assert_ne!(
            generate(10, Init::Uniform(0.5), 8, f),
            generate(10, Init::Uniform(0.5), 7, f)
        );
        assert_eq!(generate(3, Init::Constant(1.0), 1, f), vec![1.0; 3]);
        // Half types hold the same values, rounded.
        let h = generate(1000, Init::Uniform(0.5), 7, half::f16::from_f32);
        let g = generate(1000, Init::Uniform(0.5), 7, f);
        assert!(h
            .iter()
            .zip(&g)
            .all(|(h, g)| (h.to_f32() - g).abs() <= 1e-3));
    }
}
