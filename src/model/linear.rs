//! `nn.Linear` for layers that run on few rows (the text encoders' 77 per prompt), whose
//! weight can be laid out once, after loading, in the column panels our CPU kernel
//! streams ([`FusedOps::fused_linear_panels`]) instead of being packed by GEMM on every
//! call.
//!
//! The struct is named `Linear` and holds Burn's `Linear` parameters (`weight` `[in,
//! out]`, `bias`), so loaders, adapters and random initialisation treat it as one
//! (`burn-store` recognises linear layers by that name to transpose PyTorch's
//! `[out, in]`).

use burn::module::{Module, Param};
use burn::nn::LinearConfig;
use burn::tensor::Tensor;

use crate::kernels::plain;
use crate::FusedOps;

/// `nn.Linear(input, output, bias)` whose weight may hold its values in panel order.
#[derive(Module, Debug)]
pub struct Linear<B: FusedOps> {
    /// `[in, out]`: in Burn's order, or in panel order ([`plain::to_panels`]) once
    /// [`into_panels`](Self::into_panels) laid it out.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    panels: bool,
}

impl<B: FusedOps> Linear<B> {
    /// A layer with lazy (unmaterialised) parameters, initialised as Burn's `Linear`.
    pub fn new(input: usize, output: usize, bias: bool, device: &B::Device) -> Self {
        let burn::nn::Linear { weight, bias } = LinearConfig::new(input, output)
            .with_bias(bias)
            .init(device);
        Self {
            weight,
            bias,
            panels: false,
        }
    }

    /// `x·weight + bias` over the last dim of `x` `[.., in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        if self.panels {
            B::fused_linear_panels(x, self.weight.val(), bias)
        } else {
            B::fused_linear(x, self.weight.val(), bias)
        }
    }

    /// The layer with its weight in panel order when the backend runs panels faster
    /// for the weight's dtype ([`FusedOps::linear_panels`]); unchanged otherwise or when
    /// already laid out. Call once the weights are loaded: it reads them.
    pub fn into_panels(mut self) -> Self {
        if !self.panels && B::linear_panels(self.weight.val().dtype()) {
            self.weight = self.weight.map(plain::to_panels);
            self.panels = true;
        }
        self
    }

    /// Whether the weight holds its values in panel order.
    pub fn panels(&self) -> bool {
        self.panels
    }
}
