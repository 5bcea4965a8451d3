//! What adapters beside the UNet add to one of its calls: ControlNet's residuals and
//! IP-Adapter's image tokens. The UNet honours each where diffusers'
//! `UNet2DConditionModel.forward` does; empty, the call is the plain UNet's exactly.

use burn::tensor::Tensor;

use super::UNetContext;
use crate::FusedOps;

/// Per-step additions to one UNet call ([`UNet2DConditionModel::forward_prepared`]).
/// The default is empty.
///
/// [`UNet2DConditionModel::forward_prepared`]: super::UNet2DConditionModel::forward_prepared
#[derive(Debug, Clone)]
pub struct UNetExtras<B: FusedOps> {
    /// Added to each skip connection the down path saves, before the up path reads it
    /// (diffusers' `down_block_additional_residuals`, what a ControlNet outputs): one per
    /// skip, in the order they are saved (`conv_in`'s output, then each down block's
    /// resnet or transformer outputs and its downsampler's), each of its skip's shape.
    pub down_residuals: Option<Vec<Tensor<B, 4>>>,
    /// Added to the mid block's output (`mid_block_additional_residual`).
    pub mid_residual: Option<Tensor<B, 4>>,
    /// Tokens every cross-attention attends to beside the text (IP-Adapter's image
    /// tokens).
    pub tokens: Option<ExtraTokens<B>>,
}

impl<B: FusedOps> Default for UNetExtras<B> {
    fn default() -> Self {
        Self {
            down_residuals: None,
            mid_residual: None,
            tokens: None,
        }
    }
}

/// Extra cross-attention tokens (IP-Adapter's decoupled cross-attention): their keys and
/// values for every cross-attention, laid out as the text's, and the scale of their
/// attention, added to the text's before each cross-attention's output projection.
#[derive(Debug, Clone)]
pub struct ExtraTokens<B: FusedOps> {
    /// The tokens projected by the adapter's own key and value layers, one [`UNetContext`]
    /// entry per cross-attention, as many rows as the sample.
    pub kv: UNetContext<B>,
    /// Weight of the tokens' attention (0 leaves the UNet's output unchanged).
    pub scale: f64,
}
