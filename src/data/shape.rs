//! Object shapes and their exact pixel footprints.
//!
//! Geometry lives in a unit frame: an object is a shape of "radius" about 1 around the origin,
//! rotated by `angle` and scaled by `radius`. A pixel belongs to an object when the pixel's
//! centre lies inside the shape, so footprints (and therefore masks) are exact and binary.

use rand::RngExt;
use serde::{Deserialize, Serialize};

/// Half side of a square of unit size; chosen so its area (2.89) is close to a unit circle's.
const SQUARE_HALF_SIDE: f32 = 0.85;
/// Circumradius of a unit-size triangle (area 2.03: triangles are thin, so a little larger).
const TRIANGLE_RADIUS: f32 = 1.25;
/// Circumradius of a unit-size star's points.
const STAR_OUTER: f32 = 1.25;
/// The largest distance of any shape's boundary from its centre, in unit radii (blobs reach
/// 1 + 0.4); bounds the pixels that need testing.
const MAX_EXTENT: f32 = 1.45;

/// A shape kind, with the parameters that make two objects of one kind look different.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    /// A disc of radius 1.
    Circle,
    /// A square of half side 0.85.
    Square,
    /// An equilateral triangle of circumradius 1.25, centred on its centroid.
    Triangle,
    /// An ellipse with semi-axes 1.1 and `1.1 * aspect` (`aspect` in (0, 1]).
    Ellipse {
        /// Minor to major axis ratio.
        aspect: f32,
    },
    /// A star polygon: `points` tips at radius 1.25 and notches at `1.25 * inner`.
    Star {
        /// Number of tips (at least 3).
        points: u32,
        /// Notch radius as a fraction of the tip radius, in (0, 1).
        inner: f32,
    },
    /// An irregular blob: radius `1 + sum_k amp_k * sin(k * theta + phase_k)` for k = 2, 3, 4.
    Blob {
        /// Amplitudes of the 2nd, 3rd and 4th harmonics (their sum stays below 0.45).
        amplitudes: [f32; 3],
        /// Phases of those harmonics, in radians.
        phases: [f32; 3],
    },
}

impl Shape {
    /// Number of distinct kinds `sample` chooses from.
    pub const KINDS: usize = 6;

    /// Draws a shape: uniform over the kinds, then uniform parameters.
    pub fn sample<R: rand::Rng>(rng: &mut R) -> Self {
        match rng.random_range(0..Self::KINDS) {
            0 => Shape::Circle,
            1 => Shape::Square,
            2 => Shape::Triangle,
            3 => Shape::Ellipse { aspect: rng.random_range(0.45..0.8) },
            4 => {
                Shape::Star { points: rng.random_range(4..=6), inner: rng.random_range(0.45..0.6) }
            }
            _ => Shape::Blob {
                amplitudes: [
                    rng.random_range(0.05..0.15),
                    rng.random_range(0.0..0.15),
                    rng.random_range(0.0..0.1),
                ],
                phases: std::array::from_fn(|_| rng.random_range(0.0..std::f32::consts::TAU)),
            },
        }
    }

    /// Index of the kind, 0..KINDS (circle, square, triangle, ellipse, star, blob).
    pub fn kind(&self) -> usize {
        match self {
            Shape::Circle => 0,
            Shape::Square => 1,
            Shape::Triangle => 2,
            Shape::Ellipse { .. } => 3,
            Shape::Star { .. } => 4,
            Shape::Blob { .. } => 5,
        }
    }

    /// Vertices of the polygonal shapes in the unit frame (empty for curved ones).
    fn polygon(&self) -> Vec<[f32; 2]> {
        match self {
            Shape::Triangle => regular_polygon(3, |_| TRIANGLE_RADIUS),
            Shape::Star { points, inner } => regular_polygon(2 * points, |k| {
                if k % 2 == 0 {
                    STAR_OUTER
                } else {
                    STAR_OUTER * inner
                }
            }),
            _ => Vec::new(),
        }
    }

    /// Whether the unit-frame point `(u, v)` lies inside; `polygon` is `self.polygon()`.
    fn contains(&self, polygon: &[[f32; 2]], u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 1.0,
            Shape::Square => u.abs().max(v.abs()) <= SQUARE_HALF_SIDE,
            Shape::Ellipse { aspect } => {
                let (a, b) = (1.1, 1.1 * aspect);
                (u / a).powi(2) + (v / b).powi(2) <= 1.0
            }
            Shape::Triangle | Shape::Star { .. } => inside_polygon(polygon, u, v),
            Shape::Blob { amplitudes, phases } => {
                let theta = v.atan2(u);
                let radius = 1.0
                    + (0..3)
                        .map(|k| amplitudes[k] * ((k as f32 + 2.0) * theta + phases[k]).sin())
                        .sum::<f32>();
                u * u + v * v <= radius * radius
            }
        }
    }
}

/// `n` vertices at equal angles starting straight up, vertex `k` at distance `radius(k)`.
fn regular_polygon(n: u32, radius: impl Fn(u32) -> f32) -> Vec<[f32; 2]> {
    (0..n)
        .map(|k| {
            let theta = -std::f32::consts::FRAC_PI_2 + std::f32::consts::TAU * k as f32 / n as f32;
            [radius(k) * theta.cos(), radius(k) * theta.sin()]
        })
        .collect()
}

/// Even-odd crossing test: whether `(u, v)` is inside the closed polygon.
fn inside_polygon(polygon: &[[f32; 2]], u: f32, v: f32) -> bool {
    let mut inside = false;
    let mut previous = polygon[polygon.len() - 1];
    for &current in polygon {
        let crosses = (current[1] > v) != (previous[1] > v);
        if crosses {
            let t = (v - current[1]) / (previous[1] - current[1]);
            if u < current[0] + t * (previous[0] - current[0]) {
                inside = !inside;
            }
        }
        previous = current;
    }
    inside
}

/// One object of a scene: a coloured shape placed in the image.
///
/// Coordinates are fractions of the image so a scene renders at any size: `center` is
/// (x / width, y / height) and `radius` is a fraction of min(width, height).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    /// The shape and its parameters.
    pub shape: Shape,
    /// Centre, as (x, y) fractions of (width, height).
    pub center: [f32; 2],
    /// Size scale, as a fraction of min(width, height).
    pub radius: f32,
    /// Rotation, in radians.
    pub angle: f32,
    /// Base surface colour (sRGB), before the scene's shading.
    pub color: [u8; 3],
}

impl Object {
    /// The pixels of a `width` x `height` image whose centres lie inside the object, row-major.
    pub fn footprint(&self, width: usize, height: usize) -> Vec<bool> {
        let mut mask = vec![false; width * height];
        let (cx, cy, r) = self.pixel_geometry(width, height);
        let polygon = self.shape.polygon();
        let (sin, cos) = self.angle.sin_cos();
        let reach = MAX_EXTENT * r;
        let rows = pixel_span(cy - reach, cy + reach, height);
        let cols = pixel_span(cx - reach, cx + reach, width);
        for y in rows {
            for x in cols.clone() {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                // Rotate by -angle into the shape's own frame, then scale to unit size.
                let u = (cos * dx + sin * dy) / r;
                let v = (-sin * dx + cos * dy) / r;
                mask[y * width + x] = self.shape.contains(&polygon, u, v);
            }
        }
        mask
    }

    /// Centre (x, y) and radius in pixels for a `width` x `height` image.
    pub fn pixel_geometry(&self, width: usize, height: usize) -> (f32, f32, f32) {
        let side = width.min(height) as f32;
        (self.center[0] * width as f32, self.center[1] * height as f32, self.radius * side)
    }
}

/// The pixel indices whose centres can fall in `[low, high]`, clipped to `0..size`.
fn pixel_span(low: f32, high: f32, size: usize) -> std::ops::Range<usize> {
    let start = low.floor().max(0.0) as usize;
    let end = (high.ceil().max(0.0) as usize + 1).min(size);
    start.min(end)..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(shape: Shape) -> Object {
        Object { shape, center: [0.5, 0.5], radius: 0.25, angle: 0.3, color: [200, 0, 0] }
    }

    #[test]
    fn areas_are_close_to_the_formulas() {
        // At radius 16 px (64 x 64 image), pixel-centre sampling is within a few percent.
        let r2 = 16.0f32 * 16.0;
        let cases = [
            (Shape::Circle, std::f32::consts::PI),
            (Shape::Square, 4.0 * SQUARE_HALF_SIDE * SQUARE_HALF_SIDE),
            (Shape::Triangle, 1.299 * TRIANGLE_RADIUS * TRIANGLE_RADIUS),
            (Shape::Ellipse { aspect: 0.5 }, std::f32::consts::PI * 1.1 * 0.55),
        ];
        for (shape, unit_area) in cases {
            let area = object(shape.clone()).footprint(64, 64).iter().filter(|&&b| b).count();
            let want = unit_area * r2;
            assert!((area as f32 - want).abs() < 0.05 * want, "{shape:?}: {area} px, want {want}");
        }
    }

    #[test]
    fn star_notches_are_outside() {
        let star = Shape::Star { points: 5, inner: 0.5 };
        let polygon = star.polygon();
        // Straight up is a tip; halfway between two tips (36 degrees further) is a notch.
        assert!(star.contains(&polygon, 0.0, -1.1));
        let notch = -std::f32::consts::FRAC_PI_2 + std::f32::consts::PI / 5.0;
        assert!(!star.contains(&polygon, 1.0 * notch.cos(), 1.0 * notch.sin()));
        assert!(star.contains(&polygon, 0.5 * notch.cos(), 0.5 * notch.sin()));
    }
}
