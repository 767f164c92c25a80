//! Softmax over the last dimension that keeps its gradient when one is needed.

use candle_core::{Result, Tensor, D};

/// `softmax(x)` over the last dimension: candle's fused kernel at inference, and the composed
/// (differentiable) form when `x` carries gradients — the fused kernel has no backward pass,
/// so through it attention logits, and every layer before them, would never learn.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}
