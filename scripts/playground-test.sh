#!/usr/bin/env bash
# Browser test of the playground page at `/`: a real `slotserve serve` on 127.0.0.1 with an
# API key, and headless Chromium from Debian's packages driven by playwright-core
# (tests/browser/playground.mjs): key, generated scene, decomposition, slot removal, renders
# with a streamed progress bar, pixel checks, undo/redo, an uploaded JPEG, drag-and-drop
# between two images and an API error shown on the page. Screenshots of each stage go to the output folder.
#
#   scripts/playground-test.sh [--bin PATH] [--model PATH] [--out DIR] [--screenshot PATH]
#
# Without --bin it builds `cargo build --locked` and uses target/debug/slotserve. The model is
# --model, else the embedded default model (weights/), else a random-weight model of the same
# size (`slotserve init --preset shapes`): the test is about the page, and with random weights
# a render still differs from its input where a slot was removed. --out defaults to
# target/playground-test; --screenshot also copies the two-image screenshot there (the
# README's docs/playground.png is made this way). Installs Chromium from Debian's packages
# when it is missing (needs root then) and playwright-core with `npm ci` from the committed
# lock file.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=""
MODEL="${SLOTSERVE_MODEL:-}"
OUT=target/playground-test
SCREENSHOT=""
KEY="playground-test-key"

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --screenshot) SCREENSHOT="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { echo "playground-test: $*"; }
fail() { echo "playground-test: FAIL: $*" >&2; exit 1; }

# --- Chromium, Node.js packages ---------------------------------------------------------------
find_chromium() { command -v chromium-headless-shell chromium 2> /dev/null | head -n 1; }
CHROMIUM="$(find_chromium || true)"
if [ -z "$CHROMIUM" ]; then
  log "installing headless Chromium from Debian's packages"
  [ "$(id -u)" = 0 ] || fail "Chromium is missing and installing it needs root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium-headless-shell > /dev/null
  CHROMIUM="$(find_chromium)" || fail "no Chromium after installing it"
fi
command -v node > /dev/null && command -v npm > /dev/null || fail "Node.js and npm are needed"
(cd tests/browser && npm ci --prefer-offline --no-audit --no-fund --loglevel=error > /dev/null) ||
  fail "npm ci in tests/browser failed"

# --- binary, output, clean-up -----------------------------------------------------------------
if [ -z "$BIN" ]; then
  log "building: cargo build --locked"
  cargo build --locked
  BIN=target/debug/slotserve
fi
[ -x "$BIN" ] || fail "no executable at $BIN"
rm -rf "$OUT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

WORK="$(mktemp -d /tmp/slotserve-playground.XXXXXX)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2> /dev/null || true
    wait "$SERVER_PID" 2> /dev/null || true
  fi
  cp "$WORK/server.log" "$OUT/" 2> /dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$MODEL" ] && [ -e weights/config.json ]; then MODEL="$(pwd)/weights"; fi
if [ -z "$MODEL" ]; then
  MODEL="$WORK/model"
  "$BIN" init --preset shapes --out "$MODEL" > /dev/null
fi

# --- server -----------------------------------------------------------------------------------
PORT="$(python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
SLOTSERVE_HOST=127.0.0.1 SLOTSERVE_PORT="$PORT" SLOTSERVE_GRPC_PORT=0 SLOTSERVE_MODEL="$MODEL" \
  SLOTSERVE_DEVICE=cpu SLOTSERVE_API_KEY="$KEY" "$BIN" serve > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 3000); do
  curl -fs -o /dev/null "$URL/health" && break
  kill -0 "$SERVER_PID" 2> /dev/null || fail "the server exited while starting: $(tail -n 3 "$WORK/server.log")"
  sleep 0.2
done
curl -fs -o /dev/null "$URL/health" || fail "the server was not healthy after 600 s"
log "server on $URL, model $MODEL; browser $CHROMIUM"

# --- the browser test -------------------------------------------------------------------------
"$BIN" scene --seed 2 --out "$WORK/upload.jpg" > /dev/null
node tests/browser/playground.mjs --url "$URL" --key "$KEY" --chromium "$CHROMIUM" \
  --out "$OUT" --upload "$WORK/upload.jpg" ${SCREENSHOT:+--screenshot "$SCREENSHOT"}
