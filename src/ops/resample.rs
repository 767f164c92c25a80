//! Nearest-neighbour ×2 upsampling that differentiates cheaply.

use candle_core::{Result, Tensor};

/// `x` [B, C, H, W] upsampled ×2 by repeating pixels, as `F.interpolate(scale_factor=2)`.
///
/// candle differentiates its `upsample_nearest2d` through a grouped convolution, one group per
/// channel run one after another; when `x` carries gradients this writes the upsampling as a
/// broadcast instead, whose gradient is a plain sum.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !x.track_op() {
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, 2, w, 2))?.reshape((b, c, 2 * h, 2 * w))
}
