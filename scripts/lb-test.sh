#!/usr/bin/env bash
# Fault test of the load-balanced set-up, with real processes on 127.0.0.1:
# three `slotserve serve` replicas behind nginx running the repository's docker/nginx.conf.
# Under a bounded load of decompose and render requests (scripts/lb-load.py) it kills one
# replica with SIGKILL and stops a second with SIGTERM (which must finish its requests in
# flight). It passes only if every request got a complete, valid 200 answer.
#
#   scripts/lb-test.sh [--bin PATH] [--model PATH] [--requests N] [--clients C] [--steps S]
#
# Without --bin it builds `cargo build --release --locked` and uses target/release/slotserve.
# The model is --model, else the embedded default model (weights/), else a random-weight
# model of the same size (`slotserve init --preset shapes`): the test is about serving.
# Installs nginx from Debian's packages when it is missing (needs root then). Everything it
# starts is stopped on exit; the work folder (logs, nginx config, reports) is kept on failure
# or with LB_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=""
MODEL="${SLOTSERVE_MODEL:-}"
REQUESTS=48     # load requests, half decompose, half render
CLIENTS=6       # concurrent load clients
STEPS=2         # model evaluations per load render
DRAIN_STEPS=4   # per streamed render sent straight to the replica that gets SIGTERM
DRAIN_RENDERS=2
DEADLINE=600    # seconds for the whole load, after start-up

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { echo "lb-test: $*"; }
fail() { echo "lb-test: FAIL: $*" >&2; exit 1; }

# --- nginx ----------------------------------------------------------------------------------
if ! command -v nginx > /dev/null && [ ! -x /usr/sbin/nginx ]; then
  log "installing nginx from Debian's packages"
  [ "$(id -u)" = 0 ] || fail "nginx is missing and installing it needs root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light > /dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# --- binary ---------------------------------------------------------------------------------
if [ -z "$BIN" ]; then
  log "building: cargo build --release --locked"
  cargo build --release --locked
  BIN=target/release/slotserve
fi
[ -x "$BIN" ] || fail "no executable at $BIN"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"

# --- work folder, clean-up ------------------------------------------------------------------
WORK="$(mktemp -d /tmp/slotserve-lb.XXXXXX)"
chmod 755 "$WORK" # nginx workers may run as another user
PIDS=()
OK=0
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2> /dev/null || true; done
  if [ "$OK" = 1 ] && [ -z "${LB_KEEP:-}" ]; then
    rm -rf "$WORK"
  else
    log "logs and reports kept in $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$MODEL" ] && [ -e weights/config.json ]; then MODEL="$(pwd)/weights"; fi
if [ -z "$MODEL" ]; then
  MODEL="$WORK/model"
  "$BIN" init --preset shapes --out "$MODEL" > /dev/null
fi

# Free loopback ports: 3 replicas and nginx.
read -r -a PORTS <<< "$(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
LB_PORT="${PORTS[3]}"

# --- replicas -------------------------------------------------------------------------------
declare -a RPID
# nginx balances HTTP only, so the replicas run without gRPC (whose one default port they
# would otherwise contend for).
start_replica() { # index
  local i="$1"
  env -u SLOTSERVE_API_KEY SLOTSERVE_HOST=127.0.0.1 SLOTSERVE_PORT="${PORTS[$i]}" \
    SLOTSERVE_GRPC_PORT=0 SLOTSERVE_MODEL="$MODEL" SLOTSERVE_DEVICE=cpu "$BIN" serve \
    > "$WORK/replica$i.log" 2>&1 &
  RPID[$i]=$!
  PIDS+=($!)
}
for i in 0 1 2; do start_replica "$i"; done
log "replicas on ports ${PORTS[*]:0:3} (pids ${RPID[*]}), model $MODEL"

wait_healthy() { # url seconds pid
  local t=0
  until curl -fs -o /dev/null "$1"; do
    kill -0 "$3" 2> /dev/null || fail "process $3 exited while starting ($1)"
    t=$((t + 1))
    [ "$t" -le $(($2 * 5)) ] || fail "$1 not healthy after $2 s"
    sleep 0.2
  done
}
for i in 0 1 2; do wait_healthy "http://127.0.0.1:${PORTS[$i]}/health" 600 "${RPID[$i]}"; done
log "replicas ready"

# --- nginx with the repository's config ---------------------------------------------------
# Only the lines marked "lb-test" change: upstream servers (our replicas, with the file's
# parameters but for `resolve`), listen address, access log; and temporary files go to the
# work folder instead of the system's.
PARAMS="$(sed -n '/# lb-test: servers begin/,/# lb-test: servers end/s/^ *server [^ ;]*\( resolve\)\{0,1\}\([^;]*\);.*/\2/p' docker/nginx.conf)"
UPSTREAMS=""
for i in 0 1 2; do UPSTREAMS+="${UPSTREAMS:+\\n}        server 127.0.0.1:${PORTS[$i]}$PARAMS;"; done
sed -e "/# lb-test: servers begin/,/# lb-test: servers end/c\\
$UPSTREAMS" \
  -e "s|^\( *\)listen .*# lb-test: listen|\1listen 127.0.0.1:$LB_PORT;|" \
  -e "s|^\( *\)access_log .*# lb-test: access log|\1access_log $WORK/access.log slotserve;|" \
  -e "s|^http {|http {\n    client_body_temp_path $WORK/body; proxy_temp_path $WORK/proxy;\n    fastcgi_temp_path $WORK/fastcgi; uwsgi_temp_path $WORK/uwsgi; scgi_temp_path $WORK/scgi;|" \
  docker/nginx.conf > "$WORK/nginx.conf"
for want in "server 127.0.0.1:${PORTS[2]} " "listen 127.0.0.1:$LB_PORT;" "access_log $WORK/access.log" \
  "proxy_temp_path $WORK/proxy"; do
  grep -qF "$want" "$WORK/nginx.conf" || fail "docker/nginx.conf lacks an 'lb-test' marker ($want)"
done
! grep -q "server slotserve:" "$WORK/nginx.conf" || fail "the upstream servers were not replaced"
NGINX_ARGS=(-p "$WORK" -e "$WORK/error.log" -c "$WORK/nginx.conf" -g "daemon off; pid $WORK/nginx.pid;")
"$NGINX" -t -q "${NGINX_ARGS[@]}" || fail "nginx -t rejects the config"
"$NGINX" "${NGINX_ARGS[@]}" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
LB="http://127.0.0.1:$LB_PORT"
wait_healthy "$LB/health" 30 "$NGINX_PID"
log "nginx $("$NGINX" -v 2>&1 | sed 's/.*: //') on $LB"

# --- load, with faults ----------------------------------------------------------------------
IMAGES=()
for seed in 1 2 3; do
  "$BIN" scene --seed "$seed" --out "$WORK/scene$seed.png" > /dev/null
  IMAGES+=(--image "$WORK/scene$seed.png")
done
LOAD=(python3 scripts/lb-load.py)
timeout "$DEADLINE" "${LOAD[@]}" load --url "$LB" "${IMAGES[@]}" --requests "$REQUESTS" \
  --clients "$CLIENTS" --steps "$STEPS" --progress "$WORK/progress" \
  --out "$WORK/load.json" > "$WORK/load.out" 2>&1 &
LOAD_PID=$!
PIDS+=("$LOAD_PID")

answered() { cat "$WORK/progress" 2> /dev/null || echo 0; }
wait_answered() { # count
  while [ "$(answered)" -lt "$1" ]; do
    kill -0 "$LOAD_PID" 2> /dev/null || fail "the load ended early: $(tail -n 3 "$WORK/load.out")"
    sleep 0.1
  done
}

# 1. A quarter of the way in, replica 0 dies without warning.
wait_answered $((REQUESTS / 4))
kill -KILL "${RPID[0]}"
wait "${RPID[0]}" 2> /dev/null || true
log "SIGKILL replica 0 after $(answered) answers"

# 2. Halfway, replica 1 gets SIGTERM while it renders: streamed renders sent straight to it
#    (bypassing nginx, so no retry can hide a lost one) must still end with their image, and
#    it must then exit by itself with status 0.
wait_answered $((REQUESTS / 2))
R1="http://127.0.0.1:${PORTS[1]}"
timeout "$DEADLINE" "${LOAD[@]}" stream --url "$R1" "${IMAGES[@]}" --requests "$DRAIN_RENDERS" \
  --clients "$DRAIN_RENDERS" --steps "$DRAIN_STEPS" --inflight "$WORK/inflight" \
  --out "$WORK/stream.json" > "$WORK/stream.out" 2>&1 &
STREAM_PID=$!
PIDS+=("$STREAM_PID")
until [ "$(find "$WORK" -name 'inflight.*' | wc -l)" -ge "$DRAIN_RENDERS" ]; do
  kill -0 "$STREAM_PID" 2> /dev/null || break
  sleep 0.05
done
TERM_AT_ANSWERS=$(answered)
TERM_AT=$(date +%s.%N)
kill -TERM "${RPID[1]}"
log "SIGTERM replica 1 after $TERM_AT_ANSWERS answers, with $DRAIN_RENDERS streamed renders in flight on it"

STREAM_RC=0
wait "$STREAM_PID" || STREAM_RC=$?
R1_RC=timeout
for _ in $(seq $((DEADLINE * 10))); do
  if ! kill -0 "${RPID[1]}" 2> /dev/null; then
    R1_RC=0
    wait "${RPID[1]}" || R1_RC=$?
    break
  fi
  sleep 0.1
done
DRAIN_SECONDS=$(python3 -c "import time; print(round(time.time() - $TERM_AT, 2))")

wait "$LOAD_PID" || true # its report says how it went
PEAK_RSS=$(awk '/VmHWM/{print int($2 / 1024)}' "/proc/${RPID[2]}/status" 2> /dev/null || echo '?')
[ "$TERM_AT_ANSWERS" -lt "$REQUESTS" ] || fail "the load ended before the faults: raise --requests"

# --- verdict --------------------------------------------------------------------------------
kill -QUIT "$NGINX_PID" # flushes the access log
wait "$NGINX_PID" || true
python3 - "$WORK" "$REQUESTS" "$R1_RC" "$DRAIN_SECONDS" "$TERM_AT" "127.0.0.1:${PORTS[1]}" "$PEAK_RSS" << 'EOF'
import json, re, sys
work, requests, r1_rc, drain_s, term_at, r1, peak_rss = sys.argv[1:]
def report(name):
    try:
        return json.load(open(f"{work}/{name}.json"))
    except (OSError, ValueError):
        print(f"no {name} report:", open(f"{work}/{name}.out").read()[-2000:])
        return None
load, stream = report("load"), report("stream")
lines = [l for l in open(f"{work}/access.log") if re.search(r'"POST /(decompose|render)', l)]
ua = [re.search(r'ua="([^"]*)"', l).group(1) for l in lines]
status = [int(l.split('"')[2].split()[0]) for l in lines]
retried = [u for u in ua if "," in u]
# Requests nginx had passed to the SIGTERMed replica before the signal, answered by it after.
end = [float(re.search(r"msec=(\S+)", l).group(1)) for l in lines]
took = [float(re.search(r"rt=(\S+)", l).group(1)) for l in lines]
drained = sum(u.split(", ")[-1] == r1 and s == 200 and e - t < float(term_at) < e
              for u, s, e, t in zip(ua, status, end, took))
problems = []
if load is None or load["failed"] or load["answered"] != int(requests):
    problems.append("load: not every request got a valid answer")
if load and load["render_seed_mismatches"]:
    problems.append("load: renders with equal seeds differ")
if stream is None or stream["failed"]:
    problems.append("drain: a render in flight on the SIGTERMed replica was lost")
if r1_rc != "0":
    problems.append(f"drain: the SIGTERMed replica exited with status {r1_rc}")
if any(s >= 500 for s in status):
    problems.append("nginx answered 5xx")
print("--- lb-test report ---")
if load:
    print(f"load requests sent {load['sent']}, answered {load['answered']} (valid, complete), failed {load['failed']}")
    print(f"  by kind {load['by_kind']}")
    print(f"  latency p50 {load['p50_s']:.2f} s, p99 {load['p99_s']:.2f} s, max {load['max_s']:.2f} s")
    for e in load["errors"]:
        print("  error", e)
print(f"nginx: {len(lines)} POSTs logged, {len(retried)} retried on another replica "
      f"({sum(u.count(',') for u in retried)} extra tries), statuses {sorted(set(status))}")
for u, l in zip(ua, lines):
    if "," in u:
        print("  retry:", re.search(r'"POST (\S+)', l).group(1), "tried", u, re.search(r'us="([^"]*)"', l).group(1))
if stream:
    print(f"drain: {stream['answered']}/{stream['sent']} streamed renders in flight at SIGTERM "
          f"completed, and {drained} load requests it had from nginx; it exited with status {r1_rc}, "
          f"{drain_s} s after SIGTERM")
    for e in stream["errors"]:
        print("  error", e)
print(f"peak memory of a replica: {peak_rss} MiB")
print("PASS" if not problems else "FAIL: " + "; ".join(problems))
sys.exit(1 if problems else 0)
EOF
OK=1
