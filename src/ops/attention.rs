//! [`attention()`]: fused multi-head attention with an optional key mask.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `softmax(q·kᵀ·scale + mask)·v` for `q` `[B, H, Nq, d]`, `k` `[B, H, Nk, d]` and `v`
/// `[B, H, Nk, dv]`, giving `[B, H, Nq, dv]`.
///
/// `mask` (optional) holds one value per sample and key (`[B, Nk]`, or any shape with that
/// many elements such as `[B, 1, 1, Nk]`): a float mask is added to the scaled scores (0 to
/// attend, −∞ to ignore), an integer one keeps the keys where it is nonzero. Every sample needs
/// at least one attended key (otherwise its output is zeros here and NaN on the candle path).
///
/// f32 CPU inputs run a fused kernel with an online softmax that holds one tile of scores at a
/// time; they are read in place as long as their last dimension is contiguous (so
/// `x.reshape((b, n, h, d))?.transpose(1, 2)?` needs no copy), and the result is a transposed
/// view of a contiguous `[B, Nq, H, dv]` tensor (so `.transpose(1, 2)?.reshape((b, n, h * dv))`
/// needs no copy either). Other inputs, and any that carries gradients, take
/// [`attention_reference`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, heads, _, width) = q.dims4()?;
    let (kb, kh, keys, kw) = k.dims4()?;
    let (vb, vh, vn, _) = v.dims4()?;
    if (kb, kh, kw) != (batch, heads, width) || (vb, vh, vn) != (batch, heads, keys) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let fast = |t: &Tensor| super::fast_path(t) && !t.track_op();
    if !(fast(q) && fast(k) && fast(v)) {
        return attention_reference(q, k, v, scale, mask);
    }
    let key_bias = match mask {
        Some(m) => Some(key_bias(m, batch, keys)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = AttentionOp { scale: scale as f32, key_bias };
    let (q, k, v) = (last_dim_contiguous(q)?, last_dim_contiguous(k)?, last_dim_contiguous(v)?);
    q.apply_op3_no_bwd(&k, &v, &op)?.transpose(1, 2)
}

/// `[B, N, H·d]` tokens as `[B, H, N, d]` heads: a view, which [`attention()`] reads in place.
pub fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = t.dims3()?;
    t.reshape((b, n, heads, c / heads))?.transpose(1, 2)
}

/// `[B, N, 3·H·d]` tokens holding queries, keys and values side by side (a fused projection's
/// output) as three `[B, H, N, d]` views, which [`attention()`] reads in place.
pub fn split_qkv_heads(t: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, c) = t.dims3()?;
    let t = t.reshape((b, n, 3, heads, c / 3 / heads))?;
    let part = |i| t.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
    Ok((part(0)?, part(1)?, part(2)?))
}

/// `[B, H, N, d]` heads back as `[B, N, H·d]` tokens (no copy for [`attention()`]'s output).
pub fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = t.dims4()?;
    t.transpose(1, 2)?.reshape((b, n, h * d))
}

/// The plain candle computation of [`attention()`] (scores, softmax, product), used off the
/// fast path and as the reference in tests and benchmarks. f16 and bf16 scores take their
/// softmax in f32: in half precision the normaliser of hundreds or thousands of keys loses
/// most of its bits.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, _, _, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let mut scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    if let Some(m) = mask {
        let bias = key_bias(m, batch, keys)?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&bias.reshape((batch, 1, 1, keys))?)?;
    }
    // ours, not candle's fused softmax: that one has no backward pass, and through it the
    // queries and keys of every attention layer would never learn
    let weights = match scores.dtype() {
        DType::F16 | DType::BF16 => {
            super::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?
        }
        _ => super::softmax_last_dim(&scores)?,
    };
    weights.matmul(&v.contiguous()?)
}

/// The additive f32 `[batch, keys]` form of a key mask (see [`attention()`]).
fn key_bias(mask: &Tensor, batch: usize, keys: usize) -> Result<Tensor> {
    let mask = mask.reshape((batch, keys))?;
    if mask.dtype().is_float() {
        return mask.to_dtype(DType::F32);
    }
    let attend = mask.ne(&mask.zeros_like()?)?;
    let zeros = Tensor::zeros((batch, keys), DType::F32, mask.device())?;
    let ignore = Tensor::full(f32::NEG_INFINITY, (batch, keys), mask.device())?;
    attend.where_cond(&zeros, &ignore)
}

/// `t` itself when its last dimension has stride 1, else a contiguous copy.
fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// One call of the fused kernel: the scale and the additive `[batch, keys]` key bias.
struct AttentionOp {
    scale: f32,
    key_bias: Option<Vec<f32>>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "slotserve-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, tokens, _) = ql.shape().dims4()?;
        let width = vl.dims()[3];
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86::attention::{attention, Problem};
            let problem = Problem { batch, heads, scale: self.scale };
            let out = attention(
                view(q, ql)?,
                view(k, kl)?,
                view(v, vl)?,
                &problem,
                self.key_bias.as_deref(),
            );
            Ok((CpuStorage::F32(out), Shape::from((batch, tokens, heads, width))))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (q, k, v, kl, batch, heads, tokens, width, &self.key_bias, self.scale);
            Err(super::no_kernels())
        }
    }
}

/// The kernel's in-place view of a `[B, H, N, d]` CPU tensor whose last dimension has stride 1.
#[cfg(target_arch = "x86_64")]
fn view<'a>(s: &'a CpuStorage, l: &Layout) -> Result<super::x86::attention::View<'a>> {
    let (st, dims) = (l.stride(), l.dims());
    Ok(super::x86::attention::View {
        data: &s.as_slice::<f32>()?[l.start_offset()..],
        strides: [st[0], st[1], st[2]],
        tokens: dims[2],
        width: dims[3],
    })
}
