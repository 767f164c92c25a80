//! The engine's queueing and continuous batching, driven with a scripted model whose calls
//! are logged: batches form, jobs join running batches, a full queue refuses work without
//! losing any, cancelled jobs are dropped, and model failures stay with their batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::RgbImage;
use slotserve::engine::{
    collect_images, Decomposed, Engine, EngineConfig, EngineError, Metrics, Model, ModelInfo,
    RenderEvent, RenderSpec, Status,
};
use slotserve::imageio::Preprocess;
use slotserve::model::sampler::SamplerKind;
use slotserve::slots::SlotSet;

/// Render seeds the scripted model fails or panics on.
const FAILING_SEED: u64 = 666;
const PANICKING_SEED: u64 = 667;
/// Most steps the scripted model accepts.
const MAX_STEPS: usize = 5000;

/// What the scripted model was asked to do.
#[derive(Default)]
struct Log {
    denoise_batches: Vec<usize>,
    decode_batches: Vec<usize>,
    decompose_batches: Vec<usize>,
}

struct Scripted {
    log: Arc<Mutex<Log>>,
    step_delay: Duration,
}

struct Job {
    seed: u64,
    step: usize,
    total: usize,
}

impl Model for Scripted {
    type Job = Job;

    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: "scripted".into(),
            fingerprint: "scripted".into(),
            preset: "shapes".into(),
            resolution: 4,
            preprocess: Preprocess::Resize,
            num_slots: 2,
            slot_size: 1,
            timesteps: 1000,
            default_sampler: "ddim".into(),
            default_steps: 4,
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }

    fn decompose(&self, images: &[RgbImage]) -> anyhow::Result<Vec<Decomposed>> {
        self.log.lock().unwrap().decompose_batches.push(images.len());
        std::thread::sleep(self.step_delay);
        Ok(images
            .iter()
            .map(|img| {
                let v = f32::from(img.get_pixel(0, 0)[0]);
                Decomposed {
                    slots: SlotSet::new(1, vec![v, -v], "scripted").unwrap(),
                    masks: vec![0.5; 2 * 16],
                    segmentation: vec![0; 16],
                    width: 4,
                    height: 4,
                }
            })
            .collect())
    }

    fn start_render(&self, spec: &RenderSpec) -> anyhow::Result<Job> {
        anyhow::ensure!(spec.steps <= MAX_STEPS, "at most {MAX_STEPS} steps");
        Ok(Job { seed: spec.seed, step: 0, total: spec.steps })
    }

    fn progress(&self, job: &Job) -> (usize, usize) {
        (job.step, job.total)
    }

    fn denoise_step(&self, jobs: &mut [&mut Job]) -> anyhow::Result<()> {
        self.log.lock().unwrap().denoise_batches.push(jobs.len());
        std::thread::sleep(self.step_delay);
        if jobs.iter().any(|j| j.seed == PANICKING_SEED) {
            panic!("scripted panic");
        }
        anyhow::ensure!(jobs.iter().all(|j| j.seed != FAILING_SEED), "scripted failure");
        jobs.iter_mut().for_each(|j| j.step += 1);
        Ok(())
    }

    fn finish_render(&self, jobs: &[&Job]) -> anyhow::Result<Vec<RgbImage>> {
        self.log.lock().unwrap().decode_batches.push(jobs.len());
        Ok(jobs.iter().map(|j| RgbImage::from_pixel(2, 2, image::Rgb([j.seed as u8; 3]))).collect())
    }
}

struct Harness {
    engine: Engine,
    log: Arc<Mutex<Log>>,
    thread: std::thread::JoinHandle<()>,
}

async fn start(max_batch_size: usize, max_queue: usize, step_ms: u64) -> Harness {
    let log = Arc::new(Mutex::new(Log::default()));
    let model = Scripted { log: log.clone(), step_delay: Duration::from_millis(step_ms) };
    let config = EngineConfig { max_batch_size, max_queue, warmup: false };
    let (engine, thread) = Engine::start(move || Ok(model), config, Metrics::new());
    engine.wait_ready().await.expect("scripted model loads");
    Harness { engine, log, thread }
}

fn spec(seed: u64, steps: usize) -> RenderSpec {
    RenderSpec {
        slots: SlotSet::new(1, vec![1.0, 2.0], "scripted").unwrap(),
        seed,
        sampler: SamplerKind::Ddim,
        steps,
    }
}

/// Waits for the first progress event of a render.
async fn first_progress(events: &mut tokio::sync::mpsc::UnboundedReceiver<RenderEvent>) {
    match events.recv().await.expect("render events") {
        RenderEvent::Progress { .. } => {}
        RenderEvent::Image { .. } => panic!("finished before any progress"),
        RenderEvent::Failed { error, .. } => panic!("failed: {error}"),
    }
}

fn metric(engine: &Engine, name: &str) -> f64 {
    let text = engine.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn new_jobs_join_a_running_batch() {
    let h = start(8, 8, 5).await;
    let mut a = h.engine.render(vec![spec(1, 30)]).unwrap();
    first_progress(&mut a).await;
    let mut b = h.engine.render(vec![spec(2, 5), spec(3, 5)]).unwrap();
    let (ia, ib) = tokio::join!(collect_images(&mut a, 1), collect_images(&mut b, 2));
    assert_eq!(ia.unwrap()[0].get_pixel(0, 0)[0], 1);
    let ib = ib.unwrap();
    assert_eq!((ib[0].get_pixel(0, 0)[0], ib[1].get_pixel(0, 0)[0]), (2, 3));
    let batches = h.log.lock().unwrap().denoise_batches.clone();
    assert_eq!(batches[0], 1, "{batches:?}");
    assert_eq!(
        batches.iter().filter(|&&n| n == 3).count(),
        5,
        "b's jobs ran 5 steps beside a: {batches:?}"
    );
    assert_eq!(batches.iter().sum::<usize>(), 40, "every step ran exactly once: {batches:?}");
}

#[tokio::test]
async fn requests_that_waited_together_start_and_finish_together() {
    let h = start(4, 8, 200).await;
    let mut busy = h.engine.render(vec![spec(1, MAX_STEPS)]).unwrap();
    first_progress(&mut busy).await;
    // The model thread is now inside a 200 ms step: these three wait for it together.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut waiting: Vec<_> =
        (2..5).map(|seed| h.engine.render(vec![spec(seed, 3)]).unwrap()).collect();
    for events in &mut waiting {
        collect_images(events, 1).await.unwrap();
    }
    drop(busy);
    let log = h.log.lock().unwrap();
    assert_eq!(log.decode_batches, [3], "decoded together");
    let full = log.denoise_batches.iter().filter(|&&n| n == 4).count();
    assert_eq!(full, 3, "three steps beside the busy job: {:?}", log.denoise_batches);
}

#[tokio::test]
async fn batches_never_exceed_the_limit() {
    let h = start(2, 8, 2).await;
    let mut events = h.engine.render((0..5).map(|i| spec(i, 3)).collect()).unwrap();
    let images = collect_images(&mut events, 5).await.unwrap();
    let seeds: Vec<u8> = images.iter().map(|i| i.get_pixel(0, 0)[0]).collect();
    assert_eq!(seeds, vec![0, 1, 2, 3, 4]);
    let batches = h.log.lock().unwrap().denoise_batches.clone();
    assert!(batches.iter().all(|&n| n <= 2), "{batches:?}");
    assert_eq!(batches.iter().sum::<usize>(), 15);
}

#[tokio::test]
async fn waiting_decompose_requests_share_a_batch() {
    let h = start(8, 8, 20).await;
    let mut busy = h.engine.render(vec![spec(1, 3)]).unwrap();
    first_progress(&mut busy).await;
    let image = |v: u8| vec![RgbImage::from_pixel(4, 4, image::Rgb([v; 3]))];
    let (a, b, c) = tokio::join!(
        h.engine.decompose(image(10)),
        h.engine.decompose(image(20)),
        h.engine.decompose([image(30), image(40)].concat()),
    );
    assert_eq!(a.unwrap()[0].slots.values(), &[10.0, -10.0]);
    assert_eq!(b.unwrap()[0].slots.values(), &[20.0, -20.0]);
    let c = c.unwrap();
    assert_eq!((c[0].slots.values()[0], c[1].slots.values()[0]), (30.0, 40.0));
    assert_eq!(h.log.lock().unwrap().decompose_batches, vec![4]);
}

#[tokio::test]
async fn a_full_queue_refuses_work_and_loses_none() {
    let h = start(1, 2, 5).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for seed in 0..12 {
        match h.engine.render(vec![spec(seed, 3)]) {
            Ok(events) => accepted.push((seed, events)),
            Err(EngineError::QueueFull(2)) => refused += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(refused > 0 && accepted.len() >= 2, "accepted {}, refused {refused}", accepted.len());
    for (seed, mut events) in accepted {
        let images = collect_images(&mut events, 1).await.unwrap();
        assert_eq!(images[0].get_pixel(0, 0)[0], seed as u8);
        assert!(events.recv().await.is_none(), "one answer per request");
    }
    assert_eq!(metric(&h.engine, "slotserve_queue_depth"), 0.0);
}

#[tokio::test]
async fn jobs_of_departed_callers_are_dropped() {
    let h = start(4, 4, 5).await;
    let mut events = h.engine.render(vec![spec(1, MAX_STEPS)]).unwrap();
    first_progress(&mut events).await;
    drop(events);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let steps = h.log.lock().unwrap().denoise_batches.len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.log.lock().unwrap().denoise_batches.len(),
        steps,
        "no more steps after cancelling"
    );
    assert_eq!(metric(&h.engine, "slotserve_jobs_cancelled_total"), 1.0);
    assert_eq!(metric(&h.engine, "slotserve_images_rendered_total"), 0.0);
}

#[tokio::test]
async fn model_failures_stay_with_their_batch() {
    let h = start(4, 4, 1).await;
    for seed in [FAILING_SEED, PANICKING_SEED] {
        let mut events = h.engine.render(vec![spec(seed, 2)]).unwrap();
        let err = collect_images(&mut events, 1).await.unwrap_err();
        assert!(matches!(err, EngineError::Internal(_)), "{err:?}");
        let mut ok = h.engine.render(vec![spec(5, 2)]).unwrap();
        assert!(collect_images(&mut ok, 1).await.is_ok(), "the engine serves on after {err}");
    }
    let mut refused = h.engine.render(vec![spec(1, MAX_STEPS + 1)]).unwrap();
    let err = collect_images(&mut refused, 1).await.unwrap_err();
    assert!(matches!(&err, EngineError::Rejected(m) if m.contains("at most")), "{err:?}");
    assert_eq!(h.engine.status(), Status::Ready);
}

#[tokio::test]
async fn loading_and_failed_loads_are_unavailable() {
    let config = EngineConfig { max_batch_size: 1, max_queue: 1, warmup: true };
    let (engine, _thread) = Engine::start(
        || -> anyhow::Result<Scripted> {
            std::thread::sleep(Duration::from_millis(100));
            anyhow::bail!("no weights here")
        },
        config,
        Metrics::new(),
    );
    assert_eq!(engine.status(), Status::Loading);
    assert!(
        matches!(engine.render(vec![spec(1, 1)]), Err(EngineError::Unavailable(m)) if m.contains("loading"))
    );
    let reason = engine.wait_ready().await.unwrap_err();
    assert!(reason.contains("no weights here"), "{reason}");
    assert!(
        matches!(engine.decompose(vec![]).await, Err(EngineError::Unavailable(m)) if m.contains("no weights"))
    );
}

#[tokio::test]
async fn warm_up_runs_every_stage_before_ready() {
    let log = Arc::new(Mutex::new(Log::default()));
    let model = Scripted { log: log.clone(), step_delay: Duration::ZERO };
    let config = EngineConfig { max_batch_size: 1, max_queue: 1, warmup: true };
    let (engine, _thread) = Engine::start(move || Ok(model), config, Metrics::new());
    engine.wait_ready().await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(
        (log.decompose_batches.as_slice(), log.denoise_batches.as_slice()),
        (&[1][..], &[1][..])
    );
}

#[tokio::test]
async fn draining_finishes_work_in_flight() {
    let h = start(4, 4, 5).await;
    let mut events = h.engine.render(vec![spec(9, 10)]).unwrap();
    h.engine.drain();
    assert_eq!(h.engine.status(), Status::Draining);
    let mut follow_up =
        h.engine.render(vec![spec(8, 2)]).expect("requests in flight may still submit");
    drop(h.engine);
    let images = collect_images(&mut events, 1).await.unwrap();
    assert_eq!(images[0].get_pixel(0, 0)[0], 9);
    assert_eq!(collect_images(&mut follow_up, 1).await.unwrap()[0].get_pixel(0, 0)[0], 8);
    tokio::task::spawn_blocking(move || h.thread.join()).await.unwrap().unwrap();
}
