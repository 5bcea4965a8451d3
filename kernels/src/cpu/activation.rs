//! Element-wise activations on f32 in one parallel pass, through our vectorised `exp`
//! and `erf` (Burn's ops call libm per element and take a pass per op: quick GELU is
//! three).

use rayon::prelude::*;

use super::math::{exp, gelu, madd, multiversion, silu};
use super::ELEMENTWISE_TASK as TASK;
use crate::Activation;

/// `x = act(x)` in place.
pub(crate) fn activation_in_place(x: &mut [f32], act: Activation) {
    let run = |x: &mut [f32]| match act {
        Activation::Gelu => gelu_slice(x),
        Activation::GeluTanh => gelu_tanh_slice(x),
        Activation::QuickGelu => quick_gelu_slice(x),
        Activation::Silu => silu_slice(x),
    };
    if x.len() <= TASK {
        run(x);
    } else {
        x.par_chunks_mut(TASK).for_each(run);
    }
}

/// tanh-approximated GELU, `x·(1 + tanh(z))/2` with `z = √(2/π)·(x + 0.044715·x³)`,
/// written as `x − x/(e^{2z} + 1)`: no cancellation when `e^{2z}` is huge (the
/// quotient goes to 0) or tiny (to `x`).
#[inline(always)]
fn gelu_tanh<const FMA: bool>(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let z2 = 2.0 * C * madd::<FMA>(0.044_715 * x * x, x, x);
    x - x / (exp::<FMA>(z2) + 1.0)
}

/// `x·sigmoid(1.702·x)`.
#[inline(always)]
fn quick_gelu<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp::<FMA>(-1.702 * x))
}

macro_rules! slice_op {
    ($(#[$meta:meta])* $name:ident, $imp:ident, $f:ident) => {
        #[inline(always)]
        fn $imp<const FMA: bool>(xs: &mut [f32]) {
            for x in xs {
                *x = $f::<FMA>(*x);
            }
        }

        multiversion! {
            $(#[$meta])*
            fn $name(xs: &mut [f32]) => $imp
        }
    };
}

slice_op!(
    /// Exact GELU in place.
    gelu_slice, gelu_slice_imp, gelu
);
slice_op!(
    /// tanh GELU in place.
    gelu_tanh_slice, gelu_tanh_slice_imp, gelu_tanh
);
slice_op!(
    /// Quick GELU in place.
    quick_gelu_slice, quick_gelu_slice_imp, quick_gelu
);
slice_op!(
    /// SiLU in place.
    silu_slice, silu_slice_imp, silu
);
