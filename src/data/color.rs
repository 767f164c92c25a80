//! Colours: HSV sampling for objects, and the scene background.

use rand::RngExt;
use serde::{Deserialize, Serialize};

/// A colour in hue (degrees, 0..360), saturation and value (both 0..1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hsv {
    /// Hue, in degrees.
    pub hue: f32,
    /// Saturation, 0..1.
    pub saturation: f32,
    /// Value (brightness), 0..1.
    pub value: f32,
}

impl Hsv {
    /// The sRGB bytes of this colour.
    pub fn to_rgb(self) -> [u8; 3] {
        let hue = self.hue.rem_euclid(360.0) / 60.0;
        let chroma = self.value * self.saturation;
        let x = chroma * (1.0 - (hue % 2.0 - 1.0).abs());
        let (r, g, b) = match hue as u32 {
            0 => (chroma, x, 0.0),
            1 => (x, chroma, 0.0),
            2 => (0.0, chroma, x),
            3 => (0.0, x, chroma),
            4 => (x, 0.0, chroma),
            _ => (chroma, 0.0, x),
        };
        let offset = self.value - chroma;
        [r, g, b].map(|c| to_byte(c + offset))
    }
}

/// Rounds a 0..1 intensity to a byte, clamping.
pub(crate) fn to_byte(c: f32) -> u8 {
    (c * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Euclidean distance between two sRGB colours, in byte units.
pub(crate) fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f32 {
    a.iter().zip(b).map(|(&x, y)| (x as f32 - y as f32).powi(2)).sum::<f32>().sqrt()
}

/// Linear interpolation between two colours, `t` in 0..1.
fn mix(a: [u8; 3], b: [u8; 3], t: f32) -> [u8; 3] {
    std::array::from_fn(|c| to_byte((a[c] as f32 * (1.0 - t) + b[c] as f32 * t) / 255.0))
}

/// How the background is painted. All variants derive from one base colour whose hue objects
/// may share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Background {
    /// One colour everywhere.
    Flat {
        /// The colour.
        color: Hsv,
    },
    /// A linear ramp from `color` to `to` along `direction` (unit vector), across the image.
    Gradient {
        /// Colour at the start of the ramp.
        color: Hsv,
        /// Colour at the end of the ramp.
        to: Hsv,
        /// Direction of the ramp in image coordinates (x right, y down), unit length.
        direction: [f32; 2],
    },
    /// Two regions split by a line, like a floor and a wall.
    TwoTone {
        /// Colour on the side the normal points away from.
        color: Hsv,
        /// Colour on the side the normal points to.
        other: Hsv,
        /// Normal of the split line (unit length).
        normal: [f32; 2],
        /// Signed offset of the line from the image centre, as a fraction of the image size.
        offset: f32,
    },
}

impl Background {
    /// Draws a background: 20% flat, 50% gradient, 30% two-tone, muted colours.
    pub fn sample<R: rand::Rng>(rng: &mut R) -> Self {
        let color = Hsv {
            hue: rng.random_range(0.0..360.0),
            saturation: rng.random_range(0.1..0.55),
            value: rng.random_range(0.3..0.85),
        };
        let variant = |rng: &mut R, spread: f32| Hsv {
            hue: color.hue + rng.random_range(-20.0..20.0),
            saturation: (color.saturation + rng.random_range(-0.1..0.1)).clamp(0.0, 1.0),
            value: (color.value + spread * if rng.random_bool(0.5) { 1.0 } else { -1.0 })
                .clamp(0.15, 0.95),
        };
        let kind = rng.random_range(0.0..1.0);
        if kind < 0.2 {
            Background::Flat { color }
        } else if kind < 0.7 {
            let spread = rng.random_range(0.1..0.25);
            Background::Gradient {
                color,
                to: variant(rng, spread),
                direction: unit_vector(rng.random_range(0.0..std::f32::consts::TAU)),
            }
        } else {
            let spread = rng.random_range(0.08..0.18);
            Background::TwoTone {
                color,
                other: variant(rng, spread),
                normal: unit_vector(rng.random_range(0.0..std::f32::consts::TAU)),
                offset: rng.random_range(-0.3..0.3),
            }
        }
    }

    /// The base colour (the one whose hue objects may share).
    pub fn base(&self) -> Hsv {
        match self {
            Background::Flat { color }
            | Background::Gradient { color, .. }
            | Background::TwoTone { color, .. } => *color,
        }
    }

    /// The background colour at pixel (x, y) of a `width` x `height` image.
    pub fn color_at(&self, x: usize, y: usize, width: usize, height: usize) -> [u8; 3] {
        // Pixel centre in coordinates centred on the image, normalised by the larger side.
        let side = width.max(height) as f32;
        let px = (x as f32 + 0.5 - width as f32 / 2.0) / side;
        let py = (y as f32 + 0.5 - height as f32 / 2.0) / side;
        match self {
            Background::Flat { color } => color.to_rgb(),
            Background::Gradient { color, to, direction } => {
                let t = (px * direction[0] + py * direction[1] + 0.5).clamp(0.0, 1.0);
                mix(color.to_rgb(), to.to_rgb(), t)
            }
            Background::TwoTone { color, other, normal, offset } => {
                if px * normal[0] + py * normal[1] > *offset {
                    other.to_rgb()
                } else {
                    color.to_rgb()
                }
            }
        }
    }
}

/// The unit vector at `angle` radians.
fn unit_vector(angle: f32) -> [f32; 2] {
    let (sin, cos) = angle.sin_cos();
    [cos, sin]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_primaries() {
        let rgb = |hue, saturation, value| Hsv { hue, saturation, value }.to_rgb();
        assert_eq!(rgb(0.0, 1.0, 1.0), [255, 0, 0]);
        assert_eq!(rgb(120.0, 1.0, 1.0), [0, 255, 0]);
        assert_eq!(rgb(240.0, 1.0, 1.0), [0, 0, 255]);
        assert_eq!(rgb(60.0, 1.0, 1.0), [255, 255, 0]);
        assert_eq!(rgb(-60.0, 1.0, 1.0), [255, 0, 255]);
        assert_eq!(rgb(33.0, 0.0, 0.5), [128, 128, 128]);
    }
}
