//! The fast kernels of `slotserve::ops` against the plain candle ops they replace, on seeded
//! random inputs of several shapes (odd sizes, batch > 1, strided inputs).
//!
//! Tolerance: max |ours − candle| ≤ 1e-4 · max(1, max |candle|) everywhere (both sides are f32;
//! the kernels sum in a different order, and the observed gaps are around 1e-7 to 5e-6).
//! The convolution cases cover the kernel's three ways of reading its input (in place by
//! output rows, in place by padded positions, gathered panels).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Conv2dConfig;
use slotserve::ops;

/// Relative tolerance of every comparison (see the module documentation).
const TOL: f32 = 1e-4;

/// A deterministic `N(mean, std²)`-ish tensor (sum of uniforms from a 64-bit LCG).
fn random(shape: &[usize], seed: u64, mean: f32, std: f32) -> Tensor {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let n: usize = shape.iter().product();
    let values: Vec<f32> =
        (0..n).map(|_| mean + std * ((0..4).map(|_| uniform()).sum::<f32>() - 2.0)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Asserts `got ≈ want` within `TOL` relative to `want`'s largest magnitude; returns the gap.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let max_abs = |t: &Tensor| -> f32 {
        t.to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let diff =
        max_abs(&(got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap());
    let bound = TOL * max_abs(want).max(1.0);
    println!("{what}: max diff {diff:.2e} (bound {bound:.1e})");
    assert!(diff <= bound, "{what}: max diff {diff} > {bound}");
    diff
}

/// One convolution case: batch, in/out channels, input height/width, kernel, stride, padding.
struct ConvCase(usize, usize, usize, usize, usize, usize, usize, usize);

#[test]
fn conv2d_matches_candle() {
    let cases = [
        ConvCase(2, 5, 7, 9, 11, 3, 1, 1), // odd sizes, rows not a panel multiple
        ConvCase(3, 16, 13, 8, 8, 1, 1, 0), // 1×1
        ConvCase(1, 8, 6, 12, 13, 3, 2, 1), // stride 2
        ConvCase(2, 4, 8, 10, 10, 3, 2, 0), // VQ-VAE downsample after its (0,1,0,1) pad
        ConvCase(2, 64, 32, 20, 19, 3, 1, 1), // depth 576: several slabs along k
        ConvCase(1, 3, 32, 17, 17, 3, 1, 1), // 3-channel image input
        ConvCase(4, 32, 4, 5, 3, 3, 1, 1), // output narrower than a pixel panel
        ConvCase(3, 20, 9, 6, 32, 3, 1, 1), // rows a whole number of panels: read in place
        ConvCase(2, 7, 5, 7, 7, 1, 1, 0),  // 1×1 over 49 pixels: padded positions
        ConvCase(2, 6, 7, 34, 32, 3, 2, 1), // stride 2, output rows of one whole panel
        ConvCase(1, 5, 6, 31, 30, 3, 2, 1), // stride 2, odd height, 15-pixel output rows
        ConvCase(2, 8, 6, 10, 64, 1, 2, 0), // 1×1 stride 2 (a ResNet shortcut)
        ConvCase(1, 3, 10, 24, 24, 4, 4, 0), // 4×4 stride 4 (a patch embedding)
    ];
    for (i, &ConvCase(b, cin, cout, h, w, k, stride, padding)) in cases.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = random(&[b, cin, h, w], seed, 0.0, 1.0);
        let weight = random(&[cout, cin, k, k], seed + 1, 0.0, ((cin * k * k) as f32).powf(-0.5));
        let bias = (i % 2 == 0).then(|| random(&[cout], seed + 2, 0.0, 1.0));
        let cfg = Conv2dConfig { padding, stride, ..Default::default() };
        let want = candle_nn::Conv2d::new(weight.clone(), bias.clone(), cfg).forward(&x).unwrap();
        let conv = ops::Conv2d::new(weight, bias, cfg).unwrap();
        let name = format!("conv {b}×{cin}→{cout} {h}×{w} k{k} s{stride} p{padding}");
        assert_close(&name, &conv.forward(&x).unwrap(), &want);
        let residual = random(want.dims(), seed + 3, 0.0, 1.0);
        let got = conv.forward_residual(&x, &residual).unwrap();
        assert_close(&format!("{name} + residual"), &got, &(&want + &residual).unwrap());
    }
}

#[test]
fn conv2d_reads_strided_input_and_falls_back_for_f64() {
    let x = random(&[2, 6, 9, 7], 1, 0.0, 1.0).transpose(2, 3).unwrap(); // [2, 6, 7, 9], strided
    let weight = random(&[5, 6, 3, 3], 2, 0.0, 0.2);
    let bias = random(&[5], 3, 0.0, 1.0);
    let cfg = Conv2dConfig { padding: 1, ..Default::default() };
    let want = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg).forward(&x).unwrap();
    let conv = ops::Conv2d::new(weight.clone(), Some(bias.clone()), cfg).unwrap();
    assert_close("conv strided input", &conv.forward(&x).unwrap(), &want);
    let as64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let conv64 = ops::Conv2d::new(as64(&weight), Some(as64(&bias)), cfg).unwrap();
    let got = conv64.forward(&as64(&x)).unwrap();
    assert_eq!(got.dtype(), DType::F64);
    assert_close("conv f64 (candle path)", &got, &want);
}

#[test]
fn layers_load_checkpoint_keys_like_candle_nn() {
    let (cin, cout) = (4, 6);
    let tensors = std::collections::HashMap::from([
        ("conv.weight".to_string(), random(&[cout, cin, 3, 3], 50, 0.0, 0.3)),
        ("conv.bias".to_string(), random(&[cout], 51, 0.0, 1.0)),
        ("norm.weight".to_string(), random(&[cout], 52, 1.0, 0.3)),
        ("norm.bias".to_string(), random(&[cout], 53, 0.0, 0.3)),
        ("proj.weight".to_string(), random(&[3, cout], 55, 0.0, 0.3)),
        ("proj.bias".to_string(), random(&[3], 56, 0.0, 0.3)),
    ]);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let cfg = Conv2dConfig { padding: 1, ..Default::default() };
    let x = random(&[2, cin, 5, 7], 54, 0.0, 1.0);
    let plain = candle_nn::conv2d(cin, cout, 3, cfg, vb.pp("conv")).unwrap();
    let conv = ops::conv2d(cin, cout, 3, cfg, vb.pp("conv")).unwrap();
    let want = plain.forward(&x).unwrap();
    assert_close("conv2d from a VarBuilder", &conv.forward(&x).unwrap(), &want);
    let no_bias = ops::conv2d_no_bias(cin, cout, 3, cfg, vb.pp("conv")).unwrap();
    assert!(no_bias.bias().is_none());
    let plain_norm = candle_nn::group_norm(3, cout, 1e-5, vb.pp("norm")).unwrap();
    let norm = ops::group_norm(3, cout, 1e-5, vb.pp("norm")).unwrap();
    let want = plain_norm.forward(&want).unwrap();
    assert_close(
        "group_norm from a VarBuilder",
        &norm.forward(&conv.forward(&x).unwrap()).unwrap(),
        &want,
    );
    let tokens = want.flatten_from(2).unwrap().transpose(1, 2).unwrap(); // [2, 35, cout]
    let plain_proj = candle_nn::linear(cout, 3, vb.pp("proj")).unwrap();
    let proj = ops::linear(cout, 3, vb.pp("proj")).unwrap();
    let want = plain_proj.forward(&tokens.contiguous().unwrap()).unwrap();
    assert_close("linear from a VarBuilder", &proj.forward(&tokens).unwrap(), &want);
    assert!(ops::linear_no_bias(cout, 3, vb.pp("proj")).unwrap().bias().is_none());
}

#[test]
fn group_norm_matches_candle() {
    // (shape, groups, mean, std): rank 3 and 4, odd spatial sizes, inputs far from zero mean.
    let cases: [(&[usize], usize, f32, f32); 4] = [
        (&[2, 64, 7, 9], 32, 0.0, 1.0),
        (&[3, 12, 5], 4, 5.0, 3.0),
        (&[1, 32, 33, 33], 8, -2.0, 0.5),
        (&[4, 256, 4, 4], 32, 0.5, 2.0),
    ];
    for (i, &(shape, groups, mean, std)) in cases.iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let channels = shape[1];
        let x = random(shape, seed, mean, std);
        let weight = random(&[channels], seed + 1, 1.0, 0.3);
        let bias = random(&[channels], seed + 2, 0.0, 0.3);
        let shift = random(&[shape[0], channels], seed + 3, 0.0, 2.0);
        let eps = 1e-6;
        let plain =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps).unwrap();
        let fast = ops::GroupNorm::new(weight, bias, channels, groups, eps).unwrap();
        let name = format!("group norm {shape:?}/{groups}");
        let want = plain.forward(&x).unwrap();
        assert_close(&name, &fast.forward(&x).unwrap(), &want);
        assert_close(
            &format!("{name} + silu"),
            &fast.forward_silu(&x).unwrap(),
            &want.silu().unwrap(),
        );
        assert_close(
            &format!("{name} + relu"),
            &fast.forward_relu(&x).unwrap(),
            &want.relu().unwrap(),
        );
        let residual = random(shape, seed + 4, 0.0, 1.0);
        assert_close(
            &format!("{name} + residual + relu"),
            &fast.forward_residual_relu(&x, &residual).unwrap(),
            &(&want + &residual).unwrap().relu().unwrap(),
        );
        let mut dims = vec![1; shape.len()];
        dims[..2].copy_from_slice(&shape[..2]);
        let shifted = x.broadcast_add(&shift.reshape(dims).unwrap()).unwrap();
        let want = plain.forward(&shifted).unwrap().silu().unwrap();
        assert_close(
            &format!("{name} shift + silu"),
            &fast.forward_add_silu(&x, &shift).unwrap(),
            &want,
        );
    }
}

#[test]
fn linear_matches_candle() {
    // (input shape, out features, bias): ranks 2 to 4, sizes off the 6×16 tiles, many slabs.
    let cases: [(&[usize], usize, bool); 5] = [
        (&[2, 37, 50], 19, true),
        (&[3, 4, 5, 64], 256, false),
        (&[784, 256], 40, true),
        (&[1, 7, 1030], 33, true),
        (&[5, 3], 1, true),
    ];
    for (i, &(shape, out_features, with_bias)) in cases.iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let in_features = *shape.last().unwrap();
        let x = random(shape, seed, 0.0, 1.0);
        let weight =
            random(&[out_features, in_features], seed + 1, 0.0, (in_features as f32).powf(-0.5));
        let bias = with_bias.then(|| random(&[out_features], seed + 2, 0.0, 1.0));
        let want = candle_nn::Linear::new(weight.clone(), bias.clone()).forward(&x).unwrap();
        let layer = ops::Linear::new(weight, bias).unwrap();
        let name = format!("linear {shape:?} → {out_features}");
        assert_close(&name, &layer.forward(&x).unwrap(), &want);
        let residual = random(want.dims(), seed + 3, 0.0, 1.0);
        let got = layer.forward_residual(&x, &residual).unwrap();
        assert_close(&format!("{name} + residual"), &got, &(&want + &residual).unwrap());
    }
    // A strided input. (candle_nn::Linear itself returns wrong values for this transposed view
    // in candle 0.11.1: its matmul folds the batch of a non-row-major lhs against the broadcast
    // weight, huggingface/candle#3758; so the reference takes a contiguous copy.)
    let x = random(&[2, 9, 6], 600, 0.0, 1.0).transpose(1, 2).unwrap(); // [2, 6, 9]
    let weight = random(&[4, 9], 601, 0.0, 0.3);
    let contiguous = x.contiguous().unwrap();
    let want = candle_nn::Linear::new(weight.clone(), None).forward(&contiguous).unwrap();
    assert_close(
        "linear strided input",
        &ops::Linear::new(weight, None).unwrap().forward(&x).unwrap(),
        &want,
    );
}

/// LayerNorm over the last dimension in f64 with candle's tensor ops: the reference, since
/// candle's f32 kernel takes the variance as E[x²] − mean², which loses digits when the mean
/// dwarfs the spread (and it has no f64 version).
fn layer_norm_f64(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Tensor {
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let x = f64_of(x);
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
    let std =
        (centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap();
    let normed = centred.broadcast_div(&std).unwrap();
    normed.broadcast_mul(&f64_of(weight)).unwrap().broadcast_add(&f64_of(bias)).unwrap()
}

#[test]
fn layer_norm_matches_an_f64_reference() {
    // (shape, mean, std): widths off the 8-lane vectors, inputs far from zero mean; then a
    // strided input.
    let cases: [(&[usize], f32, f32); 4] = [
        (&[2, 37, 384], 0.0, 1.0),
        (&[5, 29], 4.0, 3.0),
        (&[1, 785, 64], -3.0, 0.2),
        (&[3], 1.0, 1.0),
    ];
    for (i, &(shape, mean, std)) in cases.iter().enumerate() {
        let seed = 700 + 10 * i as u64;
        let width = *shape.last().unwrap();
        let x = random(shape, seed, mean, std);
        let weight = random(&[width], seed + 1, 1.0, 0.3);
        let bias = random(&[width], seed + 2, 0.0, 0.3);
        for eps in [1e-5, 1e-12] {
            let want = layer_norm_f64(&x, &weight, &bias, eps);
            let got = ops::LayerNorm::new(weight.clone(), bias.clone(), eps)
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_close(&format!("layer norm {shape:?} eps {eps:e}"), &got, &want);
        }
    }
    let x = random(&[4, 6, 3], 750, 0.0, 1.0).transpose(1, 2).unwrap(); // [4, 3, 6], strided
    let (weight, bias) = (random(&[6], 751, 1.0, 0.3), random(&[6], 752, 0.0, 0.3));
    let want = layer_norm_f64(&x, &weight, &bias, 1e-5);
    let got = ops::LayerNorm::new(weight, bias, 1e-5).unwrap().forward(&x).unwrap();
    assert_close("layer norm strided input", &got, &want);
}

#[test]
fn gelu_and_geglu_match_candle() {
    // Sizes off the 8-lane vectors; values out to where erf saturates.
    for (i, shape) in [&[2, 37, 64][..], &[7, 26], &[3, 1, 2]].iter().enumerate() {
        let x = random(shape, 800 + i as u64, 0.0, 3.0);
        let got = ops::gelu_erf(&x).unwrap();
        assert_close(&format!("gelu {shape:?}"), &got, &x.gelu_erf().unwrap());
        let inner = shape.last().unwrap() / 2;
        let (value, gate) =
            (x.narrow(D::Minus1, 0, inner).unwrap(), x.narrow(D::Minus1, inner, inner).unwrap());
        let want = (value * gate.gelu_erf().unwrap()).unwrap();
        assert_close(&format!("geglu {shape:?}"), &ops::geglu(&x).unwrap(), &want);
    }
    assert!(ops::geglu(&random(&[2, 5], 810, 0.0, 1.0)).is_err(), "odd width");
}

/// `[B, H, N, d]` heads of a `[B, N, H·d]` token tensor, as a strided view (no copy).
fn heads(t: &Tensor, h: usize) -> Tensor {
    ops::split_heads(t, h).unwrap()
}

#[test]
fn attention_matches_candle() {
    // (batch, heads, queries, keys, key width, value width)
    let cases = [
        (2, 3, 50, 37, 32, 32),   // odd token counts
        (1, 4, 784, 784, 32, 32), // the UNet's largest self-attention
        (3, 2, 100, 16, 32, 32),  // cross-attention to slots
        (2, 1, 9, 5, 40, 24),     // widths that are not a multiple of 16
    ];
    for (i, &(b, h, nq, nk, d, dv)) in cases.iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        let q = heads(&random(&[b, nq, h * d], seed, 0.0, 1.0), h);
        let k = heads(&random(&[b, nk, h * d], seed + 1, 0.0, 1.0), h);
        let v = heads(&random(&[b, nk, h * dv], seed + 2, 0.0, 1.0), h);
        let scale = (d as f64).powf(-0.5);
        let name = format!("attention b{b} h{h} {nq}×{nk} d{d}/{dv}");
        let want = ops::attention_reference(&q, &k, &v, scale, None).unwrap();
        assert_close(&name, &ops::attention(&q, &k, &v, scale, None).unwrap(), &want);
    }
}

#[test]
fn attention_masks_keys() {
    let (b, h, nq, nk, d) = (3, 2, 30, 11, 32);
    let q = random(&[b, h, nq, d], 300, 0.0, 1.0);
    let k = random(&[b, h, nk, d], 301, 0.0, 1.0);
    let v = random(&[b, h, nk, d], 302, 0.0, 1.0);
    // Sample 0 keeps every key, sample 1 the first 4, sample 2 every other one.
    let keep: Vec<u8> = (0..b * nk)
        .map(|i| {
            u8::from(i / nk == 0 || (i / nk == 1 && i % nk < 4) || (i / nk == 2 && i % 2 == 0))
        })
        .collect();
    let keep = Tensor::from_vec(keep, (b, nk), &Device::Cpu).unwrap();
    let additive = random(&[b, 1, 1, nk], 303, 0.0, 1.0);
    for (name, mask) in [("bool mask", keep.clone()), ("additive mask", additive)] {
        let want = ops::attention_reference(&q, &k, &v, 0.2, Some(&mask)).unwrap();
        assert_close(
            &format!("attention {name}"),
            &ops::attention(&q, &k, &v, 0.2, Some(&mask)).unwrap(),
            &want,
        );
    }
    // A masked key must not matter: changing sample 1's ignored values leaves its output as is.
    let v2 = v
        .slice_assign(&[1..2, 0..h, 4..nk, 0..d], &random(&[1, h, nk - 4, d], 304, 9.0, 1.0))
        .unwrap();
    let a = ops::attention(&q, &k, &v, 0.2, Some(&keep)).unwrap();
    let b2 = ops::attention(&q, &k, &v2, 0.2, Some(&keep)).unwrap();
    assert_close(
        "masked values ignored",
        &b2.narrow(0, 1, 1).unwrap(),
        &a.narrow(0, 1, 1).unwrap(),
    );
}

#[test]
fn attention_output_views_merge_heads_without_copy() {
    let (b, h, n, d) = (2, 4, 20, 32);
    let x = random(&[b, n, h * d], 400, 0.0, 1.0);
    let out = ops::attention(&heads(&x, h), &heads(&x, h), &heads(&x, h), 0.1, None).unwrap();
    assert_eq!(out.dims(), &[b, h, n, d]);
    let merged = ops::merge_heads(&out).unwrap();
    assert_eq!(merged.dims(), &[b, n, h * d]);
    let round_trip = ops::merge_heads(&heads(&x, h)).unwrap();
    assert_eq!(
        round_trip.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    if ops::kernels_enabled() {
        assert!(merged.is_contiguous(), "fast path returns [B, N, H, d] storage");
    }
}

/// The gradients of `loss(layer(x))` with respect to `x` and each of `vars`, for a fixed
/// random projection of the output as the loss (so every output element matters).
fn gradients(
    x: &Tensor,
    vars: &[&candle_core::Var],
    forward: impl Fn(&Tensor) -> Tensor,
) -> Vec<Tensor> {
    let x = candle_core::Var::from_tensor(x).unwrap();
    let y = forward(x.as_tensor());
    let probe = random(y.dims(), 99, 0.0, 1.0);
    let loss = (y * probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    std::iter::once(&x).chain(vars.iter().copied()).map(|v| grads.get(v).unwrap().clone()).collect()
}

#[test]
fn trainable_conv2d_has_candles_gradients() {
    let cases = [
        ConvCase(2, 5, 7, 9, 11, 3, 1, 1),
        ConvCase(3, 4, 6, 10, 10, 3, 2, 0), // VQ-VAE downsample
        ConvCase(2, 6, 3, 8, 7, 1, 1, 0),   // 1×1
        ConvCase(1, 3, 8, 12, 12, 4, 4, 0), // ViT patch embedding
    ];
    let with_and_without_bias = cases.iter().enumerate().flat_map(|c| [(c, true), (c, false)]);
    for ((i, &ConvCase(b, cin, cout, h, w, k, stride, padding)), with_bias) in with_and_without_bias
    {
        let seed = 200 + 10 * i as u64;
        let x = random(&[b, cin, h, w], seed, 0.0, 1.0);
        let weight =
            candle_core::Var::from_tensor(&random(&[cout, cin, k, k], seed + 1, 0.0, 0.3)).unwrap();
        let bias = candle_core::Var::from_tensor(&random(&[cout], seed + 2, 0.0, 1.0)).unwrap();
        let cfg = Conv2dConfig { padding, stride, ..Default::default() };
        let wt = weight.as_tensor().clone();
        let bt = with_bias.then(|| bias.as_tensor().clone());
        let ours = ops::Conv2d::new(wt.clone(), bt.clone(), cfg).unwrap();
        let plain = candle_nn::Conv2d::new(wt, bt, cfg);
        let vars = if with_bias { vec![&weight, &bias] } else { vec![&weight] };
        let got = gradients(&x, &vars, |x| ours.forward(x).unwrap());
        let want = gradients(&x, &vars, |x| plain.forward(x).unwrap());
        for (what, (g, w)) in ["input", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("conv {i} (bias {with_bias}) d{what}"), g, w);
        }
    }
}

#[test]
fn trainable_group_norm_has_candles_gradients() {
    let (b, c, h, w, groups) = (3, 8, 5, 7, 4);
    let x = random(&[b, c, h, w], 300, 0.5, 2.0);
    let weight = candle_core::Var::from_tensor(&random(&[c], 301, 1.0, 0.3)).unwrap();
    let bias = candle_core::Var::from_tensor(&random(&[c], 302, 0.0, 0.3)).unwrap();
    let (wt, bt) = (weight.as_tensor().clone(), bias.as_tensor().clone());
    let ours = ops::GroupNorm::new(wt.clone(), bt.clone(), c, groups, 1e-5).unwrap();
    let plain = candle_nn::GroupNorm::new(wt, bt, c, groups, 1e-5).unwrap();
    let got = gradients(&x, &[&weight, &bias], |x| ours.forward_silu(x).unwrap());
    let want = gradients(&x, &[&weight, &bias], |x| plain.forward(x).unwrap().silu().unwrap());
    for (what, (g, w)) in ["input", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
        assert_close(&format!("group norm d{what}"), g, w);
    }
    let residual = random(&[b, c, h, w], 303, 0.0, 1.0);
    let got =
        gradients(&x, &[&weight, &bias], |x| ours.forward_residual_relu(x, &residual).unwrap());
    let want = gradients(&x, &[&weight, &bias], |x| {
        (plain.forward(x).unwrap() + &residual).unwrap().relu().unwrap()
    });
    for (what, (g, w)) in ["input", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
        assert_close(&format!("group norm + residual + relu d{what}"), g, w);
    }
}

#[test]
fn trainable_linear_and_norms_keep_candles_path() {
    let x = random(&[3, 5, 8], 900, 0.5, 1.0);
    let weight = candle_core::Var::from_tensor(&random(&[6, 8], 901, 0.0, 0.3)).unwrap();
    let bias = candle_core::Var::from_tensor(&random(&[6], 902, 0.0, 0.3)).unwrap();
    let (wt, bt) = (weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
    let ours = ops::Linear::new(wt.clone(), bt.clone()).unwrap();
    let plain = candle_nn::Linear::new(wt, bt);
    let got = gradients(&x, &[&weight, &bias], |x| ours.forward(x).unwrap());
    let want = gradients(&x, &[&weight, &bias], |x| plain.forward(x).unwrap());
    for (what, (g, w)) in ["input", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
        assert_close(&format!("linear d{what}"), g, w);
    }
    // Constant weights, an input that carries gradients: still differentiable.
    let constant = ops::Linear::new(random(&[6, 8], 903, 0.0, 0.3), None).unwrap();
    let got = gradients(&x, &[], |x| constant.forward(x).unwrap());
    let want = gradients(&x, &[], |x| x.broadcast_matmul(&constant.weight().t().unwrap()).unwrap());
    assert_close("constant linear dinput", &got[0], &want[0]);
    let got = gradients(&x, &[], |x| ops::gelu_erf(x).unwrap());
    let want = gradients(&x, &[], |x| x.gelu_erf().unwrap());
    assert_close("gelu dinput", &got[0], &want[0]);
    let got = gradients(&x, &[], |x| ops::geglu(x).unwrap());
    let want = gradients(&x, &[], |x| {
        (x.narrow(2, 0, 4).unwrap() * x.narrow(2, 4, 4).unwrap().gelu_erf().unwrap()).unwrap()
    });
    assert_close("geglu dinput", &got[0], &want[0]);
    // Trained LayerNorm weights take candle's own layer, values unchanged.
    let gamma = candle_core::Var::from_tensor(&random(&[8], 904, 1.0, 0.3)).unwrap();
    let beta = candle_core::Var::from_tensor(&random(&[8], 905, 0.0, 0.3)).unwrap();
    let (gt, bt) = (gamma.as_tensor().clone(), beta.as_tensor().clone());
    let want = candle_nn::LayerNorm::new(gt.clone(), bt.clone(), 1e-5).forward(&x).unwrap();
    let ours = ops::LayerNorm::new(gt.clone(), bt.clone(), 1e-5).unwrap();
    assert_close("trainable layer norm value", &ours.forward(&x).unwrap(), &want);
    // ... and gradients reach its input, scale and offset (candle's fused layer-norm op has
    // no backward: through it they silently stopped)
    let got = gradients(&x, &[&gamma, &beta], |x| ours.forward(x).unwrap());
    let want = gradients(&x, &[&gamma, &beta], |x| {
        layer_norm_f64(x, &gt, &bt, 1e-5).to_dtype(DType::F32).unwrap()
    });
    for (what, (g, w)) in ["input", "scale", "offset"].iter().zip(got.iter().zip(&want)) {
        assert_close(&format!("layer norm d{what}"), g, w);
    }
    // constant scale and offset, an input that carries gradients
    let constant =
        ops::LayerNorm::new(random(&[8], 906, 1.0, 0.3), random(&[8], 907, 0.0, 0.3), 1e-5)
            .unwrap();
    let got = gradients(&x, &[], |x| constant.forward(x).unwrap());
    let (cw, cb) = (random(&[8], 906, 1.0, 0.3), random(&[8], 907, 0.0, 0.3));
    let want =
        gradients(&x, &[], |x| layer_norm_f64(x, &cw, &cb, 1e-5).to_dtype(DType::F32).unwrap());
    assert_close("constant layer norm dinput", &got[0], &want[0]);
}

#[test]
fn attention_with_gradients_takes_the_differentiable_path() {
    let (b, h, n, d) = (2, 2, 7, 8);
    let q = random(&[b, h, n, d], 950, 0.0, 1.0);
    let k = random(&[b, h, n, d], 951, 0.0, 1.0);
    let v = random(&[b, h, n, d], 952, 0.0, 1.0);
    let got = gradients(&v, &[], |v| ops::attention(&q, &k, v, 0.3, None).unwrap());
    let want = gradients(&v, &[], |v| ops::attention_reference(&q, &k, v, 0.3, None).unwrap());
    assert_close("attention dvalues", &got[0], &want[0]);
    // queries and keys get their gradients through the softmax, as in the composed form
    let keys = candle_core::Var::from_tensor(&k).unwrap();
    let got = gradients(&q, &[&keys], |q| ops::attention(q, &keys, &v, 0.3, None).unwrap());
    let want = gradients(&q, &[&keys], |q| {
        let scores = (q.matmul(&keys.t().unwrap()).unwrap() * 0.3).unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v).unwrap()
    });
    assert_close("attention dqueries", &got[0], &want[0]);
    assert_close("attention dkeys", &got[1], &want[1]);
}

#[test]
fn trainable_upsampling_has_candles_gradient() {
    let x = random(&[2, 3, 4, 5], 400, 0.0, 1.0);
    let got = gradients(&x, &[], |x| ops::upsample_nearest2x(x).unwrap());
    let want = gradients(&x, &[], |x| x.upsample_nearest2d(8, 10).unwrap());
    assert_close("upsample dinput", &got[0], &want[0]);
    let tracked = candle_core::Var::from_tensor(&x).unwrap();
    let got = ops::upsample_nearest2x(tracked.as_tensor()).unwrap();
    assert_close("upsample value", &got, &x.upsample_nearest2d(8, 10).unwrap());
}

#[test]
fn softmax_keeps_its_gradient_when_one_is_needed() {
    let x = random(&[3, 5, 7], 500, 0.0, 2.0);
    let got = gradients(&x, &[], |x| ops::softmax_last_dim(x).unwrap());
    let want = gradients(&x, &[], |x| candle_nn::ops::softmax(x, D::Minus1).unwrap());
    assert_close("softmax dinput", &got[0], &want[0]);
    let fused = ops::softmax_last_dim(&x).unwrap();
    assert_close("softmax value", &fused, &candle_nn::ops::softmax(&x, D::Minus1).unwrap());
}

#[test]
fn nearest_code_matches_the_distance_matrix() {
    // 4093 entries: not a whole number of scan lanes; entry 4092 repeats entry 7, and
    // vector 0 is entry 7 itself, so an exact tie must go to the lower index
    let (n, k) = (700, 4093);
    let mut codebook = random(&[k, 3], 1, 0.0, 1.0);
    let repeat = codebook.narrow(0, 7, 1).unwrap();
    codebook = Tensor::cat(&[codebook.narrow(0, 0, k - 1).unwrap(), repeat.clone()], 0).unwrap();
    let z = Tensor::cat(&[repeat, random(&[n - 1, 3], 2, 0.0, 1.2)], 0).unwrap();
    let codebook_sq = codebook.sqr().unwrap().sum_keepdim(1).unwrap().t().unwrap();
    let got = ops::nearest_code(&z, &codebook, &codebook_sq).unwrap();
    let want = ops::nearest_code_reference(&z, &codebook, &codebook_sq).unwrap();
    let (got, want) = (got.to_vec1::<u32>().unwrap(), want.to_vec1::<u32>().unwrap());
    assert_eq!(got[0], 7, "an exact tie went to the higher index");
    // Both pick a least distance; they may part only where two entries are within f32
    // rounding of each other (the products are summed in another order).
    let distance = |i: usize, e: u32| -> f32 {
        let (row, entry) = (z.get(i).unwrap(), codebook.get(e as usize).unwrap());
        (row - entry).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let parted: Vec<usize> = (0..n).filter(|&i| got[i] != want[i]).collect();
    for &i in &parted {
        let (a, b) = (distance(i, got[i]), distance(i, want[i]));
        assert!(
            (a - b).abs() <= 1e-5,
            "vector {i}: entry {} at {a}, entry {} at {b}",
            got[i],
            want[i]
        );
    }
    assert!(parted.len() <= 2, "{} of {n} vectors took another entry", parted.len());
}

#[test]
fn fused_projection_heads_equal_separate_ones() {
    let parts: Vec<Tensor> = (0..3).map(|i| random(&[2, 5, 12], 20 + i, 0.0, 1.0)).collect();
    let fused = Tensor::cat(&parts, 2).unwrap();
    let (q, k, v) = ops::split_qkv_heads(&fused, 3).unwrap();
    for (got, part) in [q, k, v].iter().zip(&parts) {
        let want = ops::split_heads(part, 3).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert_eq!(got.stride().last(), Some(&1), "heads are read in place");
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
