//! GEGLU in one pass: reads the projection `[M, 2I]` once, writes `[M, I]`. The plain
//! path materialises both halves and the GELU before the product.

use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

#[cube(launch)]
fn geglu_kernel<F: Float>(
    input: &Tensor<F>,
    output: &mut Tensor<F>,
    half: usize,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS >= output.len() {
        terminate!();
    }
    let row = ABSOLUTE_POS / half;
    let col = ABSOLUTE_POS % half;
    let base = row * 2 * half;
    let value = f32::cast_from(input[base + col]);
    let gate = f32::cast_from(input[base + half + col]);
    // Exact GELU in f32: 0.5·g·(1 + erf(g/√2)).
    let erf = Erf::erf(gate * f32::new(std::f32::consts::FRAC_1_SQRT_2));
    let gelu = gate * f32::new(0.5) * (f32::new(1.0) + erf);
    output[ABSOLUTE_POS] = F::cast_from(value * gelu);
}

/// `x` `[.., 2I]` → `[.., I]`: `x[.., :I] · gelu(x[.., I:])`.
pub fn geglu<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let mut dims = x.meta.shape().to_vec();
    let last = dims.len() - 1;
    let half = dims[last] / 2;
    dims[last] = half;
    let out = empty_device_contiguous_dtype::<R>(
        x.client.clone(),
        x.device.clone(),
        dims.into(),
        x.dtype,
    );
    let units = out.meta.shape().num_elements();
    if units == 0 {
        return out;
    }
    let client = x.client.clone();
    let cube_dim = CubeDim::new(&client, units);
    let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
    let dtype = x.dtype;
    geglu_kernel::launch::<R>(
        &client,
        cube_count,
        cube_dim,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        half,
        dtype.into(),
    );
    out
}
