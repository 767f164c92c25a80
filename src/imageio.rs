//! Image input and output: decoding untrusted PNG/JPEG bytes within limits, the presets'
//! crop/resize rules, conversion to and from model tensors, and PNG encoding of images,
//! soft masks and palette segmentations.

use std::io::Cursor;

use candle_core::{DType, Device, Tensor};
use image::imageops::{self, FilterType};
use image::{ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

/// Why an image was refused; each kind maps to its own HTTP status in the API.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes are neither PNG nor JPEG.
    #[error("unsupported image format: only PNG and JPEG are accepted")]
    UnsupportedFormat,
    /// The image is larger than the configured limits (also catches decompression bombs,
    /// since dimensions are checked before pixels are allocated).
    #[error("image too large: {0}")]
    TooLarge(String),
    /// The image is too small to mean anything to the model.
    #[error("image too small: {0}")]
    TooSmall(String),
    /// The bytes claim a supported format but do not decode.
    #[error("invalid image: {0}")]
    Invalid(String),
}

/// Bounds on what a client may send, checked before decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLimits {
    /// Smallest accepted width or height, in pixels.
    pub min_side: u32,
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted width × height, in pixels.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { min_side: 8, max_side: 4096, max_pixels: 4096 * 4096 }
    }
}

/// Decodes PNG or JPEG bytes into 8-bit RGB, refusing other formats and oversized images
/// before their pixels are allocated.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        _ => return Err(ImageError::UnsupportedFormat),
    }
    let (w, h) = reader.into_dimensions().map_err(|e| ImageError::Invalid(e.to_string()))?;
    check_dimensions(w, h, limits)?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Invalid(e.to_string()))?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    // RGBA16 is the widest buffer a PNG or JPEG decodes into.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(decoder_limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => ImageError::TooLarge(l.to_string()),
        other => ImageError::Invalid(other.to_string()),
    })?;
    Ok(img.to_rgb8())
}

fn check_dimensions(w: u32, h: u32, limits: &ImageLimits) -> Result<(), ImageError> {
    if w < limits.min_side || h < limits.min_side {
        return Err(ImageError::TooSmall(format!(
            "{w}x{h} is below the minimum of {} pixels a side",
            limits.min_side
        )));
    }
    if w > limits.max_side || h > limits.max_side || u64::from(w) * u64::from(h) > limits.max_pixels
    {
        return Err(ImageError::TooLarge(format!(
            "{w}x{h} exceeds the limit of {} pixels a side and {} pixels in all",
            limits.max_side, limits.max_pixels
        )));
    }
    Ok(())
}

/// How a preset brings an arbitrary image to the model's square input, as in the official
/// data pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Preprocess {
    /// Resize the whole image to the resolution (CelebA); the aspect ratio is not kept.
    Resize,
    /// Center-crop a `crop`-pixel square (or the largest square if smaller), then resize
    /// (CLEVRTex: 192).
    CenterCropResize {
        /// Side of the square cropped from the center before resizing.
        crop: u32,
    },
    /// Resize so the short side equals the resolution, then center-crop (VOC, COCO).
    ShortSideCenterCrop,
}

/// Brings `img` to a `resolution`² square following `rule` (bilinear resampling).
pub fn preprocess(img: &RgbImage, rule: Preprocess, resolution: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (resolution, resolution) {
        return img.clone();
    }
    match rule {
        Preprocess::Resize => resize(img, resolution, resolution),
        Preprocess::CenterCropResize { crop } => {
            let side = crop.min(w).min(h);
            let cropped = center_crop(img, side, side);
            resize(&cropped, resolution, resolution)
        }
        Preprocess::ShortSideCenterCrop => {
            let short = w.min(h) as f64;
            let scale = f64::from(resolution) / short;
            let nw = ((f64::from(w) * scale).round() as u32).max(resolution);
            let nh = ((f64::from(h) * scale).round() as u32).max(resolution);
            center_crop(&resize(img, nw, nh), resolution, resolution)
        }
    }
}

fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    imageops::resize(img, w, h, FilterType::Triangle)
}

fn center_crop(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let x = (img.width() - w) / 2;
    let y = (img.height() - h) / 2;
    imageops::crop_imm(img, x, y, w, h).to_image()
}

/// Stacks same-sized RGB images into a `[B, 3, H, W]` f32 tensor normalised to [-1, 1]
/// (x/255, then (x − 0.5)/0.5), the input convention of every official encoder.
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let Some(first) = images.first() else {
        candle_core::bail!("no images to stack");
    };
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for img in images {
        if img.dimensions() != (w, h) {
            candle_core::bail!("images differ in size: {:?} vs {:?}", img.dimensions(), (w, h));
        }
        for c in 0..3 {
            data.extend(img.pixels().map(|p| f32::from(p[c]) / 127.5 - 1.0));
        }
    }
    Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)
}

/// Turns a `[B, 3, H, W]` tensor in [-1, 1] into 8-bit RGB images (clamped, rounded).
pub fn tensor_to_images(t: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    if c != 3 {
        candle_core::bail!("expected 3 channels, got {c}");
    }
    let t = ((t.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?;
    let data = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let o = base + y as usize * w + x as usize;
                image::Rgb([0, 1, 2].map(|ch| data[o + ch * plane] as u8))
            })
        })
        .collect())
}

/// Encodes an RGB image as PNG bytes.
pub fn encode_png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .expect("encoding a PNG into memory cannot fail");
    out
}

/// Encodes a soft mask (values in [0, 1], row-major `h`×`w`) as an 8-bit greyscale PNG.
pub fn encode_mask_png(mask: &[f32], w: u32, h: u32) -> Vec<u8> {
    let pixels: Vec<u8> = mask.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let img = image::GrayImage::from_raw(w, h, pixels).expect("mask length must be w*h");
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .expect("encoding a PNG into memory cannot fail");
    out
}

/// The slot colours, in slot order; ids past the end wrap around. Shared by segmentation
/// PNGs, ground-truth drawings and the playground, so a slot looks the same everywhere.
pub const SLOT_PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [170, 110, 40],
];

/// The colour of slot `id` in [`SLOT_PALETTE`].
pub fn slot_color(id: usize) -> [u8; 3] {
    SLOT_PALETTE[id % SLOT_PALETTE.len()]
}

/// Encodes a label map (one slot id per pixel, row-major `h`×`w`) as an indexed-colour PNG
/// whose palette index is the slot id, so clients read ids back exactly.
pub fn encode_segmentation_png(labels: &[u8], w: u32, h: u32, num_slots: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette((0..num_slots.max(1)).flat_map(slot_color).collect::<Vec<u8>>());
        let mut writer = enc.write_header().expect("valid PNG header");
        writer.write_image_data(labels).expect("label map must be w*h bytes");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x + y) as u8]))
    }

    #[test]
    fn png_round_trips_through_tensor() {
        let img = gradient(20, 12);
        let decoded = decode_image(&encode_png(&img), &ImageLimits::default()).unwrap();
        assert_eq!(decoded, img);
        let t = images_to_tensor(std::slice::from_ref(&img), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 12, 20]);
        assert_eq!(tensor_to_images(&t).unwrap()[0], img);
    }

    #[test]
    fn refuses_unknown_formats_and_garbage() {
        let limits = ImageLimits::default();
        assert!(matches!(decode_image(b"GIF89a....", &limits), Err(ImageError::UnsupportedFormat)));
        let mut png = encode_png(&gradient(8, 8));
        png.truncate(40);
        assert!(matches!(decode_image(&png, &limits), Err(ImageError::Invalid(_))));
    }

    #[test]
    fn refuses_oversized_images_before_decoding() {
        let limits = ImageLimits { min_side: 1, max_side: 16, max_pixels: 200 };
        let png = encode_png(&gradient(15, 15));
        assert!(matches!(decode_image(&png, &limits), Err(ImageError::TooLarge(_))));
    }

    #[test]
    fn preprocess_rules_give_square_outputs() {
        let img = gradient(300, 200);
        for rule in [
            Preprocess::Resize,
            Preprocess::CenterCropResize { crop: 192 },
            Preprocess::ShortSideCenterCrop,
        ] {
            assert_eq!(preprocess(&img, rule, 64).dimensions(), (64, 64), "{rule:?}");
        }
    }

    #[test]
    fn segmentation_png_keeps_slot_ids() {
        let labels: Vec<u8> = (0..16).map(|i| (i % 3) as u8).collect();
        let png = encode_segmentation_png(&labels, 4, 4, 3);
        let decoder = png::Decoder::new(Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..16], &labels[..]);
    }
}
