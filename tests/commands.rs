//! The command-line tools on the official fixtures: a converted model equals the `.pth` it
//! came from, and bad input of every kind is a clear error, never a panic.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use slotserve::checkpoint::Checkpoint;
use slotserve::commands::{self, RenderSpec, RenderStart, SlotSelection};
use slotserve::config::{ModelConfig, Preset};
use slotserve::imageio::{self, ImageError, ImageLimits};
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::model::sampler::SamplerKind;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("slotserve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn converted_model_equals_the_pth_it_came_from() {
    let Some(fx) = common::Fixture::load("converted_model_equals_pth", "voc-small") else { return };
    let out = tmp("convert");
    commands::convert(&fx.checkpoint(), Preset::Voc, &out, DType::F32).unwrap();
    let direct =
        SlotDiffusion::load(&fx.checkpoint(), Some(Preset::Voc), &Device::Cpu, DType::F32).unwrap();
    let converted = SlotDiffusion::load(&out, None, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(direct.fingerprint(), converted.fingerprint());
    assert_eq!(direct.config(), converted.config());
    let image = fx.tensor("image");
    let (a, b) = (direct.decompose(&image).unwrap(), converted.decompose(&image).unwrap());
    assert_eq!(common::max_abs_diff(&a.slots, &b.slots), 0.0);
    assert_eq!(common::max_abs_diff(&a.masks, &b.masks), 0.0);
    let slots = a.slots.get(0).unwrap();
    let render = |m: &SlotDiffusion| {
        m.render(std::slice::from_ref(&slots), &[5], SamplerKind::Ddim, 2).unwrap()
    };
    assert_eq!(common::max_abs_diff(&render(&direct), &render(&converted)), 0.0);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn half_precision_loads_and_stays_close() {
    let Some(fx) = common::Fixture::load("half_precision", "clevrtex-small") else { return };
    let model =
        SlotDiffusion::load(&fx.checkpoint(), Some(Preset::Clevrtex), &Device::Cpu, DType::F16)
            .unwrap();
    assert_eq!(model.dtype(), DType::F16);
    let d = model.decompose(&fx.tensor("image")).unwrap();
    // f16 keeps 11 bits of mantissa through ~20 layers: slots agree with f32 to ~1e-2.
    common::assert_close("f16 slots", &d.slots, &fx.tensor("slots"), 5e-2);
    let bf16 =
        SlotDiffusion::load(&fx.checkpoint(), Some(Preset::Clevrtex), &Device::Cpu, DType::BF16);
    assert!(
        format!("{:#}", bf16.unwrap_err()).contains("use f16 or f32"),
        "bf16 on the CPU is refused"
    );
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn broken_checkpoints_are_named_errors() {
    let dir = tmp("broken");
    let not_zip = write(&dir, "not_zip.pth", b"this is not a zip archive");
    let err =
        SlotDiffusion::load(&not_zip, Some(Preset::Voc), &Device::Cpu, DType::F32).unwrap_err();
    assert!(format!("{err:#}").contains("not_zip.pth"), "{err:#}");
    let Some(fx) = common::Fixture::load("broken_checkpoints", "clevrtex-small") else { return };
    let bytes = std::fs::read(fx.checkpoint()).unwrap();
    let truncated = write(&dir, "truncated.pth", &bytes[..bytes.len() / 2]);
    let err = SlotDiffusion::load(&truncated, Some(Preset::Clevrtex), &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(format!("{err:#}").contains("truncated.pth"), "{err:#}");
    let err = SlotDiffusion::load(&fx.checkpoint(), Some(Preset::Voc), &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(format!("{err:#}").contains("ResNet encoder"), "another preset: {err:#}");
    let err = SlotDiffusion::load(&fx.checkpoint(), None, &Device::Cpu, DType::F32).unwrap_err();
    assert!(format!("{err:#}").contains("--preset"), "{err:#}");

    let ckpt = Checkpoint::from_pth(&fx.checkpoint()).unwrap();
    let config = ModelConfig::infer("x", Preset::Clevrtex, &ckpt.shapes()).unwrap();
    let missing = "dm_decoder.model.diffusion_model.out.2.bias";
    let tensors = ckpt
        .shapes()
        .iter()
        .filter(|(k, _)| *k != missing)
        .map(|(k, _)| (k.clone(), ckpt.peek(k).unwrap().clone()))
        .collect::<Vec<_>>();
    let partial = Arc::new(Checkpoint::from_tensors(tensors.clone()));
    let err = SlotDiffusion::from_checkpoint(&partial, config.clone(), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains(missing), "{err:#}");
    let extra = Arc::new(Checkpoint::from_tensors(tensors.into_iter().chain([
        (missing.to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()),
        ("surplus.weight".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()),
    ])));
    let err =
        SlotDiffusion::from_checkpoint(&extra, config, &Device::Cpu, DType::F32).err().unwrap();
    assert!(format!("{err:#}").contains("surplus.weight"), "unused tensor: {err:#}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A PNG whose header claims `w`×`h` pixels (and holds none), with a valid header CRC.
fn png_header_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let crc = ihdr.iter().fold(!0u32, |mut c, &b| {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        c
    });
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend((!crc).to_be_bytes());
    // An empty IDAT chunk (CRC of "IDAT"), so readers reach the end of the header.
    png.extend(0u32.to_be_bytes());
    png.extend(b"IDAT");
    png.extend(0x35AF_061Eu32.to_be_bytes());
    png
}

#[test]
fn bad_images_are_refused_before_decoding() {
    let limits = ImageLimits::default();
    let huge = imageio::decode_image(&png_header_claiming(20_000, 20_000), &limits);
    assert!(matches!(huge, Err(ImageError::TooLarge(_))), "{huge:?}");
    let tiny = imageio::encode_png(&image::RgbImage::new(1, 1));
    assert!(matches!(imageio::decode_image(&tiny, &limits), Err(ImageError::TooSmall(_))));
    assert!(matches!(
        imageio::decode_image(b"plain text", &limits),
        Err(ImageError::UnsupportedFormat)
    ));
}

#[test]
fn decompose_and_render_files_end_to_end() {
    let Some(fx) = common::Fixture::load("decompose_and_render_files", "clevrtex-small") else {
        return;
    };
    let dir = tmp("files");
    let model =
        SlotDiffusion::load(&fx.checkpoint(), Some(Preset::Clevrtex), &Device::Cpu, DType::F32)
            .unwrap();
    let images =
        [fx.dir.join("image0_clevrtex-small.png"), fx.dir.join("image1_clevrtex-small.png")];
    let summary = commands::decompose(&model, &images, &dir).unwrap();
    assert_eq!(summary.images.len(), 2);
    assert_eq!(summary.images[0].masks.len(), 5);
    let area: f32 = summary.images[0].slots.iter().map(|s| s.area).sum();
    assert!((area - 1.0).abs() < 1e-5, "areas partition the image: {area}");
    let slots = candle_core::safetensors::load(&summary.slots_file, &Device::Cpu).unwrap();
    common::assert_close("slots file", &slots["slots"], &fx.tensor("slots"), 1e-4);

    let noise_file = dir.join("noise.safetensors");
    fx.tensor("drop0_noise").save_safetensors("noise", &noise_file).unwrap();
    let spec = RenderSpec {
        slots_file: summary.slots_file.clone(),
        index: 0,
        selection: SlotSelection::Drop(vec![0]),
        start: RenderStart::Noise(noise_file),
        sampler: SamplerKind::DpmSolverPP,
        steps: 20,
    };
    let out = dir.join("drop0.png");
    commands::render(&model, &spec, &out).unwrap();
    let png =
        imageio::decode_image(&std::fs::read(&out).unwrap(), &ImageLimits::default()).unwrap();
    let want = imageio::tensor_to_images(&fx.tensor("drop0_image")).unwrap().remove(0);
    let diff = png
        .pixels()
        .zip(want.pixels())
        .flat_map(|(a, b)| (0..3).map(move |c| a[c].abs_diff(b[c])))
        .max();
    assert!(diff <= Some(1), "rendered PNG within 1/255 of the official image: {diff:?}");

    let bad = RenderSpec { selection: SlotSelection::Keep(vec![7]), ..spec.clone() };
    assert!(commands::render(&model, &bad, &out).unwrap_err().to_string().contains("slot index 7"));
    let narrow = dir.join("narrow.safetensors");
    Tensor::zeros((5, 32), DType::F32, &Device::Cpu)
        .unwrap()
        .save_safetensors("slots", &narrow)
        .unwrap();
    let wrong_width = RenderSpec { slots_file: narrow, selection: SlotSelection::All, ..spec };
    assert!(commands::render(&model, &wrong_width, &out)
        .unwrap_err()
        .to_string()
        .contains("width 32"));
    std::fs::remove_dir_all(dir).unwrap();
}
