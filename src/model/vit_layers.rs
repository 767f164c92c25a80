//! The transformer layers of the DINO ViT under Hugging Face's transformers-4 `ViTLayer` names
//! (`encoder.layer.N.{layernorm_before, attention.attention.{query, key, value},
//! attention.output.dense, layernorm_after, intermediate.dense, output.dense}`): pre-norm
//! multi-head self-attention and a GELU (erf) MLP, each with a residual connection.
//!
//! candle-transformers' `vit::Encoder` has the same names and maths, but runs candle's own
//! attention, softmax, LayerNorm and scalar GELU; these layers run the `ops` kernels instead,
//! which is most of the speed of decompose on a CPU.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::vit::ViTConfig;
use crate::ops::{
    attention, gelu_erf, layer_norm, linear, merge_heads, split_heads, split_qkv_heads,
};
use crate::ops::{LayerNorm, Linear};

/// The query, key and value projections of one layer (`attention.attention.{query, key,
/// value}`).
#[derive(Debug, Clone)]
enum Projections {
    /// Constant weights: one product on the three matrices stacked, which reads and packs the
    /// tokens once instead of three times (each output column is computed as in its own layer).
    Fused(Linear),
    /// Trained weights, which stay three variables.
    Separate([Linear; 3]),
}

impl Projections {
    /// Reads the three layers; constant weights are stacked before anything is packed, so
    /// only the fused layer's weights are.
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let [q, k, v] = ["query", "key", "value"].map(|name| candle_nn::linear(c, c, vb.pp(name)));
        let layers = [q?, k?, v?];
        let tensors = |l: &candle_nn::Linear| [Some(l.weight().clone()), l.bias().cloned()];
        if layers.iter().flat_map(tensors).flatten().any(|t| t.is_variable()) {
            let [q, k, v] = layers.map(Linear::from_candle);
            return Ok(Self::Separate([q?, k?, v?]));
        }
        let weight = Tensor::cat(&layers.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
        let biases = layers.iter().map(|l| l.bias()).collect::<Option<Vec<_>>>();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Self::Fused(Linear::new(weight, bias)?))
    }

    /// Queries, keys and values of `x` [B, N, C] as `heads` heads [B, H, N, C / H].
    fn heads(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Fused(qkv) => split_qkv_heads(&qkv.forward(x)?, heads),
            Self::Separate([q, k, v]) => {
                let split = |layer: &Linear| split_heads(&layer.forward(x)?, heads);
                Ok((split(q)?, split(k)?, split(v)?))
            }
        }
    }
}

/// Multi-head self-attention (`attention.attention`) and its output projection
/// (`attention.output.dense`).
#[derive(Debug, Clone)]
struct SelfAttention {
    projections: Projections,
    output: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(cfg: &ViTConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(Self {
            projections: Projections::new(c, vb.pp("attention"))?,
            output: linear(c, c, vb.pp("output.dense"))?,
            heads: cfg.num_heads,
        })
    }

    /// Self-attention of `x` [B, N, C], plus `residual`.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (q, k, v) = self.projections.heads(x, self.heads)?;
        let scale = ((x.dim(2)? / self.heads) as f64).powf(-0.5);
        let out = merge_heads(&attention(&q, &k, &v, scale, None)?)?;
        self.output.forward_residual(&out, residual)
    }
}

/// One pre-norm transformer layer.
#[derive(Debug, Clone)]
struct Layer {
    layernorm_before: LayerNorm,
    attention: SelfAttention,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
}

impl Layer {
    fn new(cfg: &ViTConfig, eps: f64, vb: VarBuilder) -> Result<Self> {
        let (c, hidden) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            layernorm_before: layer_norm(c, eps, vb.pp("layernorm_before"))?,
            attention: SelfAttention::new(cfg, vb.pp("attention"))?,
            layernorm_after: layer_norm(c, eps, vb.pp("layernorm_after"))?,
            intermediate: linear(c, hidden, vb.pp("intermediate.dense"))?,
            output: linear(hidden, c, vb.pp("output.dense"))?,
        })
    }
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.attention.forward_residual(&self.layernorm_before.forward(x)?, x)?;
        let hidden = gelu_erf(&self.intermediate.forward(&self.layernorm_after.forward(&x)?)?)?;
        self.output.forward_residual(&hidden, &x)
    }
}

/// The stack of layers (`encoder.layer.N`), tokens [B, N, C] in and out.
#[derive(Debug, Clone)]
pub struct ViTLayers(Vec<Layer>);

impl ViTLayers {
    /// Builds `cfg.num_layers` layers from `vb` (at the ViT's `encoder` prefix); `eps` is the
    /// LayerNorm epsilon.
    pub fn new(cfg: &ViTConfig, eps: f64, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layer");
        (0..cfg.num_layers).map(|i| Layer::new(cfg, eps, vb.pp(i))).collect::<Result<_>>().map(Self)
    }
}

impl Module for ViTLayers {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.iter().try_fold(x.clone(), |x, layer| layer.forward(&x))
    }
}
