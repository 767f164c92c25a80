//! The DINO ViT feature extractor of the VOC and COCO models: a Hugging Face `ViTModel`
//! (frozen), whose last hidden state without the CLS token is the feature map (official
//! `dino.py`). The transformer layers ([`ViTLayers`]) use the same (transformers 4) names,
//! LayerNorm eps 1e-12 and exact (erf) GELU; the embeddings interpolate position embeddings
//! to other input sizes.
//! The official wrapper only runs at its training size; other sizes are our extension,
//! following Hugging Face's `interpolate_pos_encoding` (bicubic, `align_corners = False`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::model::vit_layers::ViTLayers;
use crate::ops::{conv2d, layer_norm, Conv2d, LayerNorm};
use serde::{Deserialize, Serialize};

use crate::checkpoint::ShapeMap;

/// Random initialisation of the CLS token and position embeddings (Hugging Face ViT's
/// `initializer_range` 0.02), for models that start from random weights.
const EMBEDDING_INIT: candle_nn::Init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
/// LayerNorm epsilon of the Hugging Face ViT (`layer_norm_eps`).
const LAYER_NORM_EPS: f64 = 1e-12;

/// Sizes of the ViT; all but the head count are readable from a checkpoint's shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViTConfig {
    /// Token width (384 for ViT-S, 768 for ViT-B).
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Attention heads (6 for ViT-S, 12 for ViT-B).
    pub num_heads: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Side of a square patch in pixels (8 or 16).
    pub patch_size: usize,
    /// Side of the patch grid the position embeddings were trained for (28 for 224/8).
    pub grid_size: usize,
}

impl ViTConfig {
    /// Reads the sizes from the tensors under `prefix` (e.g. `encoder.dino`); the head count
    /// cannot be read from shapes and is given.
    pub fn infer(shapes: &ShapeMap, prefix: &str, num_heads: usize) -> Result<Self> {
        let key = |k: &str| format!("{prefix}.{k}");
        let positions = shapes.dim(&key("embeddings.position_embeddings"), 1)? - 1;
        let grid_size = (positions as f64).sqrt().round() as usize;
        if grid_size * grid_size != positions {
            candle_core::bail!(
                "{prefix}: {positions} position embeddings do not form a square grid"
            );
        }
        Ok(Self {
            hidden_size: shapes.dim(&key("embeddings.cls_token"), 2)?,
            num_layers: shapes.count_indexed(&key("encoder.layer")),
            num_heads,
            intermediate_size: shapes.dim(&key("encoder.layer.0.intermediate.dense.weight"), 0)?,
            patch_size: shapes.dim(&key("embeddings.patch_embeddings.projection.weight"), 2)?,
            grid_size,
        })
    }

    /// Side of the patch grid for an image side of `n` pixels (incomplete patches at the
    /// right and bottom edges are dropped, as by the stride-`p` patch convolution).
    pub fn grid_side(&self, n: usize) -> usize {
        n / self.patch_size
    }
}

/// Maps a transformers-5 DINO tensor name (under `encoder.dino.`) to the transformers-4 name
/// our modules read (`layers.N.attention.q_proj` → `encoder.layer.N.attention.attention.query`,
/// `o_proj` → `attention.output.dense`, `mlp.fc1`/`fc2` → `intermediate.dense`/`output.dense`);
/// every other name passes unchanged, so it can be applied to every key of a checkpoint.
/// The v5 names are those of `ViTModel` in transformers 5.23 (`modeling_vit.py`, and the
/// inverse of the `"ViTModel"` renaming in its `conversion_mapping.py`): the layers sit
/// directly under the model as `layers.N`; embeddings, `layernorm_before`/`layernorm_after`,
/// the final `layernorm` and `pooler` keep their v4 names.
pub fn canonical_name(name: &str) -> String {
    const RENAMES: [(&str, &str); 6] = [
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
    ];
    let Some(rest) = name.strip_prefix("encoder.dino.") else { return name.to_string() };
    let rest = rest.strip_prefix("encoder.").unwrap_or(rest);
    let Some(rest) = rest.strip_prefix("layers.") else { return name.to_string() };
    let Some((index, tail)) = rest.split_once('.') else { return name.to_string() };
    if index.parse::<usize>().is_err() {
        return name.to_string();
    }
    let tail = RENAMES
        .iter()
        .find_map(|(new, old)| tail.strip_prefix(new).map(|t| format!("{old}{t}")))
        .unwrap_or_else(|| tail.to_string());
    format!("encoder.dino.encoder.layer.{index}.{tail}")
}

/// Bicubic resampling weights of PyTorch (`a = −0.75`, `align_corners = False`) mapping `n`
/// input positions to `m` outputs: an [m, n] matrix, border indices clamped.
fn bicubic_matrix(n: usize, m: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic = |x: f64| {
        let x = x.abs();
        if x <= 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
        } else {
            0.0
        }
    };
    let scale = n as f64 / m as f64;
    let mut w = vec![0f32; m * n];
    for o in 0..m {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        for k in -1..=2 {
            let idx = (base as i64 + k).clamp(0, n as i64 - 1) as usize;
            w[o * n + idx] += cubic(src - (base + k as f64)) as f32;
        }
    }
    w
}

/// Patch embedding, CLS token and position embeddings (interpolated for other grid sizes).
#[derive(Debug, Clone)]
struct Embeddings {
    patch: Conv2d,
    cls_token: Tensor,
    /// [1, 1 + g², C].
    position: Tensor,
    grid_size: usize,
}

impl Embeddings {
    fn new(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let patch_cfg = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        Ok(Self {
            patch: conv2d(3, c, cfg.patch_size, patch_cfg, vb.pp("patch_embeddings.projection"))?,
            cls_token: vb.get_with_hints((1, 1, c), "cls_token", EMBEDDING_INIT)?,
            position: vb.get_with_hints(
                (1, 1 + cfg.grid_size * cfg.grid_size, c),
                "position_embeddings",
                EMBEDDING_INIT,
            )?,
            grid_size: cfg.grid_size,
        })
    }

    /// Position embeddings of the patches for an `h`×`w` grid [1, h·w, C]: the trained ones
    /// when the grid matches, else bicubically resampled (as Hugging Face's
    /// `interpolate_pos_encoding`).
    fn patch_positions(&self, h: usize, w: usize) -> Result<Tensor> {
        let g = self.grid_size;
        let c = self.position.dim(2)?;
        let patches = self.position.narrow(1, 1, g * g)?;
        if (h, w) == (g, g) {
            return Ok(patches);
        }
        let dev = patches.device();
        let grid = patches.reshape((g, g, c))?.to_dtype(DType::F32)?;
        let rows = Tensor::from_vec(bicubic_matrix(g, h), (h, g), dev)?;
        let cols = Tensor::from_vec(bicubic_matrix(g, w), (w, g), dev)?;
        // Rows: [h, g] × [g, g·C]; then columns: [w, g] × [g, C] for each of the h rows.
        let by_rows = rows.matmul(&grid.reshape((g, g * c))?)?.reshape((h, g, c))?;
        let resampled =
            cols.unsqueeze(0)?.broadcast_as((h, w, g))?.contiguous()?.matmul(&by_rows)?;
        resampled.reshape((1, h * w, c))?.to_dtype(self.position.dtype())
    }

    /// Image [B, 3, H, W] → tokens [B, 1 + h·w, C] and the patch grid (h, w).
    fn forward(&self, x: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let patches = self.patch.forward(x)?;
        let (b, c, h, w) = patches.dims4()?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let patches = patches.broadcast_add(&self.patch_positions(h, w)?)?;
        let cls = self
            .cls_token
            .broadcast_add(&self.position.narrow(1, 0, 1)?)?
            .broadcast_as((b, 1, c))?;
        Ok((Tensor::cat(&[&cls, &patches], 1)?, (h, w)))
    }
}

/// The DINO ViT as a feature extractor.
#[derive(Debug, Clone)]
pub struct ViT {
    embeddings: Embeddings,
    encoder: ViTLayers,
    layernorm: LayerNorm,
}

impl ViT {
    /// Builds the ViT from tensors named as in the official checkpoints (prefix `encoder.dino`).
    pub fn new(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        Ok(Self {
            embeddings: Embeddings::new(vb.pp("embeddings"), cfg)?,
            encoder: ViTLayers::new(cfg, LAYER_NORM_EPS, vb.pp("encoder"))?,
            layernorm: layer_norm(cfg.hidden_size, LAYER_NORM_EPS, vb.pp("layernorm"))?,
        })
    }
}

impl Module for ViT {
    /// Image [B, 3, H, W] → feature map [B, C, H/p, W/p]: the final hidden state after the
    /// last LayerNorm, without the CLS token.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, (h, w)) = self.embeddings.forward(x)?;
        let hidden = self.layernorm.forward(&self.encoder.forward(&tokens)?)?;
        let (b, n, c) = hidden.dims3()?;
        hidden.narrow(1, 1, n - 1)?.transpose(1, 2)?.reshape((b, c, h, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers5_names_map_to_transformers4() {
        let cases = [
            (
                "encoder.dino.layers.3.attention.q_proj.weight",
                "encoder.dino.encoder.layer.3.attention.attention.query.weight",
            ),
            (
                "encoder.dino.encoder.layers.0.attention.o_proj.bias",
                "encoder.dino.encoder.layer.0.attention.output.dense.bias",
            ),
            (
                "encoder.dino.layers.0.attention.k_proj.bias",
                "encoder.dino.encoder.layer.0.attention.attention.key.bias",
            ),
            (
                "encoder.dino.layers.11.attention.v_proj.weight",
                "encoder.dino.encoder.layer.11.attention.attention.value.weight",
            ),
            ("encoder.dino.embeddings.cls_token", "encoder.dino.embeddings.cls_token"),
            ("encoder.dino.pooler.dense.weight", "encoder.dino.pooler.dense.weight"),
            (
                "encoder.dino.layers.1.mlp.fc1.weight",
                "encoder.dino.encoder.layer.1.intermediate.dense.weight",
            ),
            (
                "encoder.dino.layers.1.mlp.fc2.bias",
                "encoder.dino.encoder.layer.1.output.dense.bias",
            ),
            (
                "encoder.dino.layers.1.layernorm_before.weight",
                "encoder.dino.encoder.layer.1.layernorm_before.weight",
            ),
            (
                "encoder.dino.encoder.layer.1.output.dense.bias",
                "encoder.dino.encoder.layer.1.output.dense.bias",
            ),
            (
                "dm_decoder.model.diffusion_model.out.2.weight",
                "dm_decoder.model.diffusion_model.out.2.weight",
            ),
        ];
        for (v5, v4) in cases {
            assert_eq!(canonical_name(v5), v4);
        }
    }

    #[test]
    fn bicubic_rows_sum_to_one_and_mirror() {
        for (n, m) in [(28, 28), (28, 40), (28, 16), (4, 7)] {
            let w = bicubic_matrix(n, m);
            for o in 0..m {
                let row = &w[o * n..(o + 1) * n];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                // align_corners = False is symmetric: the last output mirrors the first.
                for i in 0..n {
                    assert!((row[i] - w[(m - 1 - o) * n + (n - 1 - i)]).abs() < 1e-6);
                }
                if n == m {
                    assert!((row[o] - 1.0).abs() < 1e-6, "identity at the native size");
                }
            }
        }
        // [0, 1] → 4 samples, worked out by hand from PyTorch's rule (A = −0.75, taps clamped
        // to the border): the overshoot at both ends is the bicubic kernel's negative lobe.
        let w = bicubic_matrix(2, 4);
        let up: Vec<f32> = (0..4).map(|o| w[o * 2 + 1]).collect();
        for (got, want) in up.iter().zip([-27.0, 58.0, 198.0, 283.0].map(|x| x / 256.0)) {
            assert!((got - want).abs() < 1e-6, "{up:?}");
        }
    }
}
