//! Procedural multi-object scenes with exact ground-truth masks, for training, evaluation,
//! tests and docs.
//!
//! A [`Scene`] is a description (background, lighting, objects in painter's order) drawn
//! deterministically from a `u64` seed ([`Scene::generate`]); [`Scene::render`] turns it into
//! an image and instance masks in the layout of the DeepMind multi-object datasets. Because the
//! description is kept, counterfactuals render exactly: [`Scene::without`] removes an object
//! (revealing what was behind it), [`Scene::with_object_from`] adds another scene's object on top.
//!
//! Edges are not antialiased: every pixel's colour is the surface of exactly the id its mask
//! says, so counterfactual images differ from the original only where the edited object was.

mod color;
mod render;
mod shape;

use std::path::{Path, PathBuf};

use image::ImageResult;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use color::{Background, Hsv};
pub use render::{cell_coverage, label_map_image, palette_color, Rendered};
pub use shape::{Object, Shape};

/// Placement attempts per object before the least-occluding attempt is kept.
const PLACEMENT_TRIES: usize = 40;
/// Smallest RGB distance between a freshly drawn object colour and the background's base colour.
const MIN_CONTRAST: f32 = 80.0;
/// Seeds at and above this value are held out for evaluation (see [`scene_seed`]).
pub const EVAL_SEED_OFFSET: u64 = 1 << 63;

/// How scenes are drawn. `Default` is the training distribution; [`SceneConfig::crowded`] has
/// more objects than training used, for the generalisation row of `slotserve eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneConfig {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Fewest objects in a scene.
    pub min_objects: usize,
    /// Most objects in a scene; masks have `max_objects + 1` channels.
    pub max_objects: usize,
    /// Smallest object radius, as a fraction of min(width, height).
    pub min_radius: f32,
    /// Largest object radius, as a fraction of min(width, height).
    pub max_radius: f32,
    /// Each object keeps at least this fraction of its own area visible after occlusion, when
    /// some placement among the tries allows it (otherwise the least-occluding one is kept).
    pub min_visible: f32,
    /// Probability that an object reuses the exact colour of an earlier object.
    pub shared_color_prob: f64,
    /// Probability that an object takes the background's hue (at a clearly different
    /// brightness and saturation).
    pub background_hue_prob: f64,
}

impl Default for SceneConfig {
    fn default() -> Self {
        Self {
            width: 64,
            height: 64,
            min_objects: 2,
            max_objects: 6,
            min_radius: 0.08,
            max_radius: 0.2,
            min_visible: 0.4,
            shared_color_prob: 0.25,
            background_hue_prob: 0.15,
        }
    }
}

impl SceneConfig {
    /// Like the default, with 7 to 9 slightly smaller objects: more than training used.
    pub fn crowded() -> Self {
        Self {
            min_objects: 7,
            max_objects: 9,
            min_radius: 0.07,
            max_radius: 0.16,
            ..Self::default()
        }
    }
}

/// Which disjoint range of seeds a scene comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Split {
    /// Seeds `0..2^63`.
    Train,
    /// Seeds `2^63..`: never drawn by training.
    Eval,
}

/// The seed of the `index`-th scene of `split`; the splits never share a seed.
pub fn scene_seed(split: Split, index: u64) -> u64 {
    assert!(index < EVAL_SEED_OFFSET, "scene index {index} out of range");
    match split {
        Split::Train => index,
        Split::Eval => EVAL_SEED_OFFSET + index,
    }
}

/// A scene description: everything needed to render it (and its counterfactuals) exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Mask channels minus one: the largest object count this scene's dataset allows.
    pub max_objects: usize,
    /// The background painting.
    pub background: Background,
    /// Brightness gain across an object per object radius, along x and y: a soft light that
    /// makes touching objects of one colour distinguishable.
    pub light: [f32; 2],
    /// Objects in painter's order: `objects[0]` is at the back, object `i` has mask id `i + 1`.
    pub objects: Vec<Object>,
}

impl Scene {
    /// Draws the scene of `seed` from `cfg` (same seed and config, same scene, bit for bit).
    pub fn generate(cfg: &SceneConfig, seed: u64) -> Self {
        assert!(
            1 <= cfg.min_objects && cfg.min_objects <= cfg.max_objects,
            "object count range {}..={}",
            cfg.min_objects,
            cfg.max_objects
        );
        assert!(
            0.0 < cfg.min_radius && cfg.min_radius <= cfg.max_radius,
            "radius range {}..{}",
            cfg.min_radius,
            cfg.max_radius
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let background = Background::sample(&mut rng);
        let strength = rng.random_range(0.05..0.15f32);
        let (sin, cos) = rng.random_range(0.0..std::f32::consts::TAU).sin_cos();
        let mut scene = Scene {
            width: cfg.width,
            height: cfg.height,
            max_objects: cfg.max_objects,
            background,
            light: [strength * cos, strength * sin],
            objects: Vec::new(),
        };
        let count = rng.random_range(cfg.min_objects..=cfg.max_objects);
        let mut layout = Layout::new(cfg.width, cfg.height);
        for _ in 0..count {
            let color = scene.pick_color(&mut rng, cfg);
            let shape = Shape::sample(&mut rng);
            let (object, footprint) = layout.place(&mut rng, cfg, shape, color);
            layout.push(&footprint);
            scene.objects.push(object);
        }
        scene
    }

    /// The same scene with object `i` removed: the background and the objects behind it show
    /// where it was. Objects above it move down one id.
    pub fn without(&self, i: usize) -> Scene {
        let mut scene = self.clone();
        scene.objects.remove(i);
        scene
    }

    /// This scene with object `j` of `other` added on top (same position, size and colour,
    /// this scene's lighting); it gets the next id, growing `max_objects` if needed.
    pub fn with_object_from(&self, other: &Scene, j: usize) -> Scene {
        let mut scene = self.clone();
        scene.objects.push(other.objects[j].clone());
        scene.max_objects = scene.max_objects.max(scene.objects.len());
        scene
    }

    /// Whether two of the objects share a base colour: the scenes where colour alone cannot
    /// tell objects apart, which `eval` scores separately.
    pub fn shares_a_colour(&self) -> bool {
        let objects = &self.objects;
        objects.iter().enumerate().any(|(i, a)| objects[i + 1..].iter().any(|b| a.color == b.color))
    }

    /// Paints the scene: image [H, W, 3] and the id visible at each pixel.
    pub fn render(&self) -> Rendered {
        let (width, height) = (self.width, self.height);
        let mut labels = vec![0u32; width * height];
        for (i, object) in self.objects.iter().enumerate() {
            let footprint = object.footprint(width, height);
            for (label, _) in labels.iter_mut().zip(footprint).filter(|(_, inside)| *inside) {
                *label = i as u32 + 1;
            }
        }
        let image = labels
            .iter()
            .enumerate()
            .flat_map(|(p, &id)| self.surface_color(p % width, p / width, id))
            .collect();
        Rendered {
            width,
            height,
            num_masks: self.max_objects.max(self.objects.len()) + 1,
            image,
            labels,
        }
    }

    /// The colour of surface `id` (0 = background) at pixel (x, y).
    fn surface_color(&self, x: usize, y: usize, id: u32) -> [u8; 3] {
        let Some(object) = id.checked_sub(1).map(|i| &self.objects[i as usize]) else {
            return self.background.color_at(x, y, self.width, self.height);
        };
        let (cx, cy, r) = object.pixel_geometry(self.width, self.height);
        let along =
            ((x as f32 + 0.5 - cx) * self.light[0] + (y as f32 + 0.5 - cy) * self.light[1]) / r;
        object.color.map(|c| color::to_byte(c as f32 / 255.0 * (1.0 + along)))
    }

    /// A colour for the next object: an earlier object's, the background's hue, or a fresh
    /// colour that stands out from the background.
    fn pick_color(&self, rng: &mut ChaCha8Rng, cfg: &SceneConfig) -> [u8; 3] {
        if !self.objects.is_empty() && rng.random_bool(cfg.shared_color_prob) {
            return self.objects[rng.random_range(0..self.objects.len())].color;
        }
        let base = self.background.base();
        if rng.random_bool(cfg.background_hue_prob) {
            return Hsv {
                hue: base.hue,
                saturation: (base.saturation + 0.35).min(1.0),
                value: if base.value < 0.55 { base.value + 0.4 } else { base.value - 0.4 },
            }
            .to_rgb();
        }
        let mut fresh = || {
            Hsv {
                hue: rng.random_range(0.0..360.0),
                saturation: rng.random_range(0.55..1.0),
                value: rng.random_range(0.5..1.0),
            }
            .to_rgb()
        };
        let mut color = fresh();
        for _ in 0..PLACEMENT_TRIES {
            if color::rgb_distance(color, base.to_rgb()) >= MIN_CONTRAST {
                break;
            }
            color = fresh();
        }
        color
    }
}

/// Occlusion bookkeeping while objects are placed: who is visible where, and full areas.
struct Layout {
    width: usize,
    height: usize,
    /// Visible id per pixel so far (0 = background).
    labels: Vec<u32>,
    /// Full footprint area of each placed object, in pixels.
    areas: Vec<usize>,
}

impl Layout {
    fn new(width: usize, height: usize) -> Self {
        Self { width, height, labels: vec![0; width * height], areas: Vec::new() }
    }

    /// Draws positions for a new top object until every object below keeps `cfg.min_visible`
    /// of its area; returns the first such placement or else the least occluding one.
    fn place(
        &self,
        rng: &mut ChaCha8Rng,
        cfg: &SceneConfig,
        shape: Shape,
        color: [u8; 3],
    ) -> (Object, Vec<bool>) {
        let side = self.width.min(self.height) as f32;
        let mut best: Option<(f32, Object, Vec<bool>)> = None;
        for _ in 0..PLACEMENT_TRIES {
            let radius = rng.random_range(cfg.min_radius..=cfg.max_radius);
            // Keep the centre far enough inside that most of the object is in the frame.
            let margin = 0.7 * radius * side;
            let center = [self.width, self.height].map(|size| {
                let m = (margin / size as f32).min(0.5);
                rng.random_range(m..=1.0 - m)
            });
            let object = Object {
                shape: shape.clone(),
                center,
                radius,
                angle: rng.random_range(0.0..std::f32::consts::TAU),
                color,
            };
            let footprint = object.footprint(self.width, self.height);
            let score = self.worst_visibility(&footprint);
            if score >= cfg.min_visible {
                return (object, footprint);
            }
            if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                best = Some((score, object, footprint));
            }
        }
        let (_, object, footprint) = best.expect("at least one placement was tried");
        (object, footprint)
    }

    /// The smallest visible fraction of any placed object if `footprint` went on top.
    fn worst_visibility(&self, footprint: &[bool]) -> f32 {
        let mut visible = vec![0usize; self.areas.len()];
        for (&id, &covered) in self.labels.iter().zip(footprint) {
            if id > 0 && !covered {
                visible[id as usize - 1] += 1;
            }
        }
        visible
            .iter()
            .zip(&self.areas)
            .map(|(&v, &area)| v as f32 / area.max(1) as f32)
            .fold(1.0, f32::min)
    }

    /// Puts an object's footprint on top.
    fn push(&mut self, footprint: &[bool]) {
        self.areas.push(footprint.iter().filter(|&&b| b).count());
        let id = self.areas.len() as u32;
        for (label, _) in self.labels.iter_mut().zip(footprint).filter(|(_, &b)| b) {
            *label = id;
        }
    }
}

/// Where `write_scene` puts the mask picture for image path `out`: `<stem>_masks.png` beside it.
pub fn masks_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}_masks.png"))
}

/// `slotserve scene`: renders the scene of `seed` to `out` (PNG) and, with `masks`, its palette
/// mask picture to [`masks_path`]; returns the paths written.
pub fn write_scene(
    cfg: &SceneConfig,
    seed: u64,
    out: &Path,
    masks: bool,
) -> ImageResult<Vec<PathBuf>> {
    let rendered = Scene::generate(cfg, seed).render();
    rendered.save_image(out)?;
    let mut written = vec![out.to_path_buf()];
    if masks {
        let path = masks_path(out);
        rendered.save_masks(&path)?;
        written.push(path);
    }
    Ok(written)
}
