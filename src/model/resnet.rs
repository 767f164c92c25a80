//! The ResNet feature extractor of the CLEVRTex and CelebA models: ResNet-18/34 basic blocks
//! with GroupNorm in place of BatchNorm (checkpoint names still say `bn`), a 3×3 stride-1
//! stem without max-pooling (small inputs), and the last stage optional (official `resnet.py`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::{conv2d_no_bias, group_norm, Conv2d, GroupNorm};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// Groups of every GroupNorm (`_gn(..., num_groups=32)`).
const NORM_GROUPS: usize = 32;
/// GroupNorm epsilon (PyTorch's default).
const NORM_EPS: f64 = 1e-5;

/// Sizes of the ResNet; all readable from a checkpoint's shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Width of the stem and the first stage (64 in ResNet-18).
    pub stem_channels: usize,
    /// Basic blocks per stage (ResNet-18: [2, 2, 2] without layer 4); stage i has
    /// `stem_channels * 2^i` channels and stages after the first halve the resolution.
    pub blocks: Vec<usize>,
}

impl ResNetConfig {
    /// Reads the stage layout from the tensors under `prefix` (e.g. `encoder`).
    pub fn infer(shapes: &ShapeMap, prefix: &str) -> Result<Self> {
        let stages = (1..=4)
            .take_while(|i| shapes.contains(&format!("{prefix}.layer{i}.0.conv1.weight")))
            .count();
        Ok(Self {
            stem_channels: shapes.dim(&format!("{prefix}.conv1.weight"), 0)?,
            blocks: (1..=stages)
                .map(|i| shapes.count_indexed(&format!("{prefix}.layer{i}")))
                .collect(),
        })
    }

    /// Channels of the output feature map.
    pub fn out_channels(&self) -> usize {
        self.stem_channels << (self.blocks.len() - 1)
    }

    /// How much smaller the feature map is than the image, per side.
    pub fn stride(&self) -> usize {
        1 << (self.blocks.len() - 1)
    }

    /// Side of the feature map for an image side of `n` pixels: each stage after the first
    /// halves it rounding up (3×3 and 1×1 convolutions of stride 2, padding 1 and 0), so
    /// sides that are not multiples of [`ResNetConfig::stride`] round up.
    pub fn grid_side(&self, n: usize) -> usize {
        (1..self.blocks.len()).fold(n, |n, _| n.div_ceil(2))
    }
}

fn conv(in_c: usize, out_c: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d_no_bias(
        in_c,
        out_c,
        k,
        Conv2dConfig { padding: k / 2, stride, ..Default::default() },
        vb,
    )
}

fn norm(c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    group_norm(NORM_GROUPS, c, NORM_EPS, vb)
}

/// Two 3×3 convolutions with a residual connection (projected when the shape changes).
#[derive(Debug, Clone)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: GroupNorm,
    conv2: Conv2d,
    bn2: GroupNorm,
    downsample: Option<(Conv2d, GroupNorm)>,
}

impl BasicBlock {
    fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || in_c != out_c {
            Some((
                conv(in_c, out_c, 1, stride, vb.pp("downsample.0"))?,
                norm(out_c, vb.pp("downsample.1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: conv(in_c, out_c, 3, stride, vb.pp("conv1"))?,
            bn1: norm(out_c, vb.pp("bn1"))?,
            conv2: conv(out_c, out_c, 3, 1, vb.pp("conv2"))?,
            bn2: norm(out_c, vb.pp("bn2"))?,
            downsample,
        })
    }
}

impl Module for BasicBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward_relu(&self.conv1.forward(x)?)?;
        let h = self.conv2.forward(&h)?;
        let identity = match &self.downsample {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?)?,
            None => x.clone(),
        };
        self.bn2.forward_residual_relu(&h, &identity)
    }
}

/// The ResNet trunk: image [B, 3, H, W] → feature map [B, C, H/s, W/s].
#[derive(Debug, Clone)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: GroupNorm,
    blocks: Vec<BasicBlock>,
}

impl ResNet {
    /// Builds the trunk from tensors named as in the official checkpoints.
    pub fn new(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        let c0 = cfg.stem_channels;
        let mut blocks = Vec::new();
        let mut in_c = c0;
        for (stage, &n) in cfg.blocks.iter().enumerate() {
            let out_c = c0 << stage;
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    in_c,
                    out_c,
                    stride,
                    vb.pp(format!("layer{}", stage + 1)).pp(i),
                )?);
                in_c = out_c;
            }
        }
        Ok(Self { conv1: conv(3, c0, 3, 1, vb.pp("conv1"))?, bn1: norm(c0, vb.pp("bn1"))?, blocks })
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward_relu(&self.conv1.forward(x)?)?;
        self.blocks.iter().try_fold(h, |h, b| b.forward(&h))
    }
}
