//! `slotserve serve` started as a user starts it (the real binary): every setting the server
//! issue names is both a flag and an environment variable, as `/info` shows; `--log-format
//! json` writes one JSON object a line, with a line per request naming its method, path,
//! status and latency; SIGTERM ends it with exit status 0.

mod api_common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

/// The API key the servers of these tests require.
const API_KEY: &str = "test-key";

/// (flag, environment variable, value, where `/info` reports it).
const SETTINGS: &[(&str, &str, &str, &str)] = &[
    ("--device", "SLOTSERVE_DEVICE", "cpu", "/model/device"),
    ("--dtype", "SLOTSERVE_DTYPE", "f16", "/model/dtype"),
    ("--max-batch-size", "SLOTSERVE_MAX_BATCH_SIZE", "3", "/limits/max_batch_size"),
    ("--max-queue", "SLOTSERVE_MAX_QUEUE", "5", "/limits/max_queue"),
    ("--max-concurrent", "SLOTSERVE_MAX_CONCURRENT", "6", "/limits/max_concurrent"),
    ("--max-images", "SLOTSERVE_MAX_IMAGES", "2", "/limits/max_images"),
    ("--max-slots", "SLOTSERVE_MAX_SLOTS", "9", "/limits/max_slots"),
    ("--max-steps", "SLOTSERVE_MAX_STEPS", "7", "/limits/max_steps"),
    ("--payload-limit", "SLOTSERVE_PAYLOAD_LIMIT", "123456", "/limits/payload_limit"),
    ("--max-image-pixels", "SLOTSERVE_MAX_IMAGE_PIXELS", "40000", "/limits/max_image_pixels"),
    ("--max-image-side", "SLOTSERVE_MAX_IMAGE_SIDE", "300", "/limits/max_image_side"),
    ("--request-timeout", "SLOTSERVE_REQUEST_TIMEOUT", "9", "/limits/request_timeout_secs"),
];

/// A folder with the tiny test model, written once per test process.
fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("slotserve-serve-cli-{}", std::process::id()));
        slotserve::commands::init(&api_common::tiny_config(), api_common::MODEL_SEED, &dir)
            .expect("write the tiny model");
        dir
    })
}

/// A `slotserve serve` process and its log lines (stderr).
struct Served {
    child: Child,
    base: String,
    logs: Receiver<String>,
}

impl Served {
    /// Starts the binary on 127.0.0.1 with an ephemeral HTTP port, no gRPC and no warm-up, with
    /// `configure` giving the rest of its settings, and reads its address from the
    /// `HTTP listening` log line.
    fn start(configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_slotserve"));
        command
            .arg("serve")
            .env_clear()
            .env("RUST_LOG", "info")
            .env("SLOTSERVE_HOST", "127.0.0.1")
            .env("SLOTSERVE_PORT", "0")
            .env("SLOTSERVE_GRPC_PORT", "0")
            .env("SLOTSERVE_WARMUP", "false")
            .env("SLOTSERVE_MODEL", model_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().expect("start slotserve");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (send, logs) = channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        let mut served = Self { child, base: String::new(), logs };
        let listening = served.wait_for_log(|l| l["message"] == "HTTP listening");
        let address = listening["address"].as_str().expect("address field").to_string();
        served.base = format!("http://{address}");
        served
    }

    /// The next log line matching `wanted`, each line checked to be a JSON object.
    fn wait_for_log(&self, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line =
                self.logs.recv_timeout(Duration::from_secs(60)).expect("the expected log line");
            let parsed: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            for field in ["timestamp", "level", "target", "message"] {
                assert!(parsed.get(field).is_some(), "no `{field}` in {line}");
            }
            if wanted(&parsed) {
                return parsed;
            }
        }
    }

    async fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            let mut request = client.get(format!("{}{path}", self.base));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            match request.send().await {
                Ok(r) if r.status() != 503 => {
                    let status = r.status().as_u16();
                    return (status, r.json().await.unwrap_or(Value::Null));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("{} never answered {path}", self.base);
    }

    /// Checks that `/info` reports every setting of [`SETTINGS`] and that the API key is
    /// required, then stops the server.
    async fn check_settings_and_stop(self) {
        assert_eq!(self.get("/health", None).await.0, 200, "/health needs no key");
        assert_eq!(self.get("/info", None).await.0, 401, "the API key is required");
        let (status, info) = self.get("/info", Some(API_KEY)).await;
        assert_eq!(status, 200, "{info}");
        for (flag, _, value, pointer) in SETTINGS {
            let reported = info.pointer(pointer).unwrap_or_else(|| panic!("{pointer} in {info}"));
            let reported = reported.as_str().map_or_else(|| reported.to_string(), str::to_string);
            assert_eq!(&reported, value, "{flag} is reported at {pointer}");
        }
        self.stop();
    }

    /// Stops the server with SIGTERM and expects a clean exit.
    fn stop(mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(status.unwrap().success());
        assert!(self.child.wait().unwrap().success(), "SIGTERM ends the server cleanly");
    }
}

#[tokio::test]
async fn every_setting_is_an_environment_variable() {
    let served = Served::start(|command| {
        command.env("SLOTSERVE_API_KEY", API_KEY).env("SLOTSERVE_LOG_FORMAT", "json");
        for (_, env, value, _) in SETTINGS {
            command.env(env, value);
        }
    });
    served.check_settings_and_stop().await;
}

#[tokio::test]
async fn every_setting_is_a_flag() {
    let served = Served::start(|command| {
        command.args(["--api-key", API_KEY, "--log-format", "json"]);
        for (flag, _, value, _) in SETTINGS {
            command.args([flag, value]);
        }
    });
    served.check_settings_and_stop().await;
}

#[tokio::test]
async fn json_logs_have_a_line_per_request() {
    let served = Served::start(|command| {
        command.args(["--log-format", "json"]);
    });
    assert_eq!(served.get("/info", None).await.0, 200);
    // Requests while the model loads were answered 503; the one that got 200 was logged too.
    let line = served.wait_for_log(|l| l["path"] == "/info" && l["status"] == 200);
    assert_eq!(line["message"], "request", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
    assert_eq!(served.get("/no-such-path", None).await.0, 404);
    let line = served.wait_for_log(|l| l["message"] == "request" && l["path"] == "/no-such-path");
    assert_eq!(line["status"], 404, "{line}");
    served.stop();
}
