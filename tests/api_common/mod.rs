//! Shared helpers of the HTTP and gRPC API tests: a real server on 127.0.0.1 with ephemeral
//! ports, serving a tiny random SlotDiffusion model, and a reqwest client.
#![allow(dead_code)]

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use image::RgbImage;
use serde_json::{json, Value};
use slotserve::api::{self, Settings};
use slotserve::config::{ModelConfig, Preset};
use slotserve::model::encoder::{BackboneConfig, EncoderConfig};
use slotserve::model::pipeline::SlotDiffusion;
use slotserve::model::resnet::ResNetConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Seed of the tiny model's weights.
pub const MODEL_SEED: u64 = 7;
/// Slots per image of the tiny model.
pub const NUM_SLOTS: usize = 4;
/// Slot width of the tiny model.
pub const SLOT_SIZE: usize = 32;

/// The clevrtex preset shrunk to a 32² model with 4 slots of width 32: every stage of the
/// real network, small enough for a test to render in well under a second.
pub fn tiny_config() -> ModelConfig {
    let mut c = ModelConfig::preset(Preset::Clevrtex);
    c.name = "tiny-test".into();
    c.encoder = EncoderConfig {
        backbone: BackboneConfig::Resnet(ResNetConfig { stem_channels: 32, blocks: vec![1, 1] }),
        grid_size: 16,
        out_channels: SLOT_SIZE,
    };
    c.resolution = c.encoder.input_resolution();
    c.preprocess = slotserve::imageio::Preprocess::Resize;
    let sa = &mut c.slot_attention;
    (sa.num_slots, sa.slot_size, sa.in_features, sa.mlp_hidden_size) =
        (NUM_SLOTS, SLOT_SIZE, SLOT_SIZE, 2 * SLOT_SIZE);
    let u = &mut c.unet;
    (u.model_channels, u.channel_mult, u.num_res_blocks) = (32, vec![1, 2], 1);
    (u.attention_levels, u.context_dim) = (vec![false, true], SLOT_SIZE);
    let v = &mut c.vqvae;
    (v.ch, v.ch_mult, v.num_res_blocks, v.n_embed) = (32, vec![1, 2], 1, 64);
    c
}

/// The tiny model's VQ codebook, the one variable not left to the seeded initialisation.
const CODEBOOK: &str = "dm_decoder.vae.vqvae.quantize.embedding.weight";

/// The tiny model with its seeded random weights. The codebook is spread over [-1, 1]
/// (random initialisation leaves it at zero, which would snap every render to the same
/// image), so renders depend on slots and seeds as a trained model's do.
pub fn tiny_model() -> anyhow::Result<SlotDiffusion> {
    let config = tiny_config();
    let (codes, dim) = (config.vqvae.n_embed, config.vqvae.embed_dim);
    let values: Vec<f32> = (0..codes * dim).map(|i| ((i as f32 + 1.0) * 12.9898).sin()).collect();
    let codebook = Var::from_tensor(&Tensor::from_vec(values, (codes, dim), &Device::Cpu)?)?;
    let vars = VarMap::new();
    vars.data().lock().expect("fresh var map").insert(CODEBOOK.to_string(), codebook);
    Ok(SlotDiffusion::random(&config, MODEL_SEED, &vars, &Device::Cpu)?)
}

/// Settings for tests: no warm-up, small limits.
pub fn settings() -> Settings {
    let mut s = Settings::default();
    s.limits.max_steps = 50;
    s.limits.max_images = 4;
    s.limits.payload_limit = 1 << 20;
    s.limits.max_image_pixels = 512 * 512;
    s.limits.max_image_side = 1024;
    s
}

/// A server running in this process.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client for it.
    pub client: reqwest::Client,
    /// `http://127.0.0.1:PORT` of the gRPC API, when the server has it.
    pub grpc: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// Starts a server with the tiny model and waits until `/health` says ready.
    pub async fn start(settings: Settings) -> Self {
        let server = Self::spawn(settings, tiny_model).await;
        server.wait_ready().await;
        server
    }

    /// Starts a server with the tiny model and the gRPC API beside HTTP, and waits until
    /// `/health` says ready.
    pub async fn start_with_grpc(settings: Settings) -> Self {
        let server = Self::listen(settings, tiny_model, true).await;
        server.wait_ready().await;
        server
    }

    /// Starts a server whose model `loader` makes, without waiting for it.
    pub async fn spawn<F>(settings: Settings, loader: F) -> Self
    where
        F: FnOnce() -> anyhow::Result<SlotDiffusion> + Send + 'static,
    {
        Self::listen(settings, loader, false).await
    }

    /// Starts a server (with gRPC when `grpc`) whose model `loader` makes, without waiting.
    pub async fn listen<F>(settings: Settings, loader: F, grpc: bool) -> Self
    where
        F: FnOnce() -> anyhow::Result<SlotDiffusion> + Send + 'static,
    {
        let bind = || TcpListener::bind("127.0.0.1:0");
        let http = bind().await.expect("bind an ephemeral port");
        let base = format!("http://{}", http.local_addr().unwrap());
        let grpc = match grpc {
            true => Some(bind().await.expect("bind an ephemeral port")),
            false => None,
        };
        let grpc_base = grpc.as_ref().map(|l| format!("http://{}", l.local_addr().unwrap()));
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = api::Listeners { http, grpc };
        let task = tokio::spawn(api::run(listeners, settings, loader, async move {
            let _ = stopped.await;
        }));
        Self { base, client: reqwest::Client::new(), grpc: grpc_base, stop: Some(stop), task }
    }

    /// Polls `/health` until it answers 200.
    pub async fn wait_ready(&self) {
        for _ in 0..600 {
            if let Ok(r) = self.client.get(self.url("/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {} never became ready", self.base);
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON and returns the status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(body).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GETs JSON.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// The value of the first metric line starting with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        metric_value(&self.metrics().await, prefix)
    }

    /// Decomposes `images` and returns their slot sets.
    pub async fn slot_sets(&self, images: &[RgbImage]) -> Vec<Value> {
        let pngs: Vec<String> = images.iter().map(png_base64).collect();
        let (status, body) = self.post("/decompose?masks=false", &json!({ "images": pngs })).await;
        assert_eq!(status, 200, "{body}");
        body["images"].as_array().unwrap().iter().map(|i| i["slots"].clone()).collect()
    }

    /// Waits for the server to stop by itself and returns what `run` returned.
    pub async fn stop_when_done(self) -> anyhow::Result<()> {
        let result = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        result.expect("the server stops").expect("server task")
    }

    /// Stops the server (as a signal would) and returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stop.take());
        self.task.await.expect("server task")
    }
}

/// The value of the first line of Prometheus `text` starting with `prefix`.
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(prefix).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A test picture: a gradient with a bright square whose place depends on `seed`.
pub fn picture(seed: u32, w: u32, h: u32) -> RgbImage {
    let (sx, sy) = ((seed * 7) % w.max(1), (seed * 13) % h.max(1));
    RgbImage::from_fn(w, h, |x, y| {
        let inside = x >= sx && x < sx + w / 3 && y >= sy && y < sy + h / 3;
        match inside {
            true => image::Rgb([250, 240, (seed * 40) as u8]),
            false => image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90]),
        }
    })
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Vec<u8> {
    slotserve::imageio::encode_png(img)
}

/// Base64 PNG of an image.
pub fn png_base64(img: &RgbImage) -> String {
    STANDARD.encode(png(img))
}

/// Decodes a base64 PNG from a response.
pub fn decode_png(b64: &Value) -> RgbImage {
    let bytes = STANDARD.decode(b64.as_str().expect("base64 string")).expect("base64");
    image::load_from_memory(&bytes).expect("PNG").to_rgb8()
}

/// The values of a slot set in a response.
pub fn slot_values(set: &Value) -> Vec<f32> {
    let bytes = STANDARD.decode(set["data"].as_str().expect("slot data")).expect("base64");
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Largest per-channel difference between two images, in 1/255 units.
pub fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}
