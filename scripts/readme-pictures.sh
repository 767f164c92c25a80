#!/usr/bin/env bash
# Makes the README's "what you can do" pictures with the server itself: starts `slotserve
# serve` on the default model, then only talks HTTP to it (GET /scene, POST /decompose,
# POST /edit), writing PNGs under docs/examples/.
#
#   scripts/readme-pictures.sh [--bin target/release/slotserve] [--model weights]
#                              [--scene-a 11] [--scene-b 24] [--out docs/examples]
set -euo pipefail

bin=target/release/slotserve
model=weights
scene_a=11
scene_b=24
out=docs/examples
port=${PORT:-3917}
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --scene-a) scene_a=$2; shift 2 ;;
    --scene-b) scene_b=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$out"
work=$(mktemp -d)
SLOTSERVE_GRPC_PORT=0 "$bin" serve --model "$model" --port "$port" 2> "$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT

url=http://127.0.0.1:$port
for _ in $(seq 600); do
  curl -sf "$url/health" > /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done

post() { curl -sf -H 'content-type: application/json' -d @"$2" "$url/$1"; }
png() { jq -r "$1" | base64 -d; }

# the slot to edit: the largest one after the background (the largest of all)
object_slot() {
  jq '[.images[0].objects[] | {slot, area}] | sort_by(-.area) | .[1].slot' "$1"
}

for name in a b; do
  seed=$([ $name = a ] && echo "$scene_a" || echo "$scene_b")
  curl -sf "$url/scene?seed=$seed" -o "$out/scene_$name.png"
  curl -sf -F image=@"$out/scene_$name.png" "$url/decompose" > "$work/$name.json"
  png '.images[0].segmentation' < "$work/$name.json" > "$out/scene_${name}_slots.png"
done

slot_a=$(object_slot "$work/a.json")
slot_b=$(object_slot "$work/b.json")
cat > "$work/remove.json" <<JSON
{"images": ["$(base64 -w0 "$out/scene_a.png")"],
 "operations": [{"op": "remove", "image": 0, "slot": $slot_a}], "seed": 7}
JSON
post edit "$work/remove.json" | png '.outputs[0].image.png' > "$out/scene_a_removed.png"

cat > "$work/swap.json" <<JSON
{"images": ["$(base64 -w0 "$out/scene_a.png")", "$(base64 -w0 "$out/scene_b.png")"],
 "operations": [{"op": "swap", "a": {"image": 0, "slot": $slot_a},
                 "b": {"image": 1, "slot": $slot_b}}], "seed": 7}
JSON
post edit "$work/swap.json" > "$work/swapped.json"
png '.outputs[0].image.png' < "$work/swapped.json" > "$out/scene_a_swapped.png"
png '.outputs[1].image.png' < "$work/swapped.json" > "$out/scene_b_swapped.png"

echo "removed slot $slot_a of scene $scene_a; swapped it with slot $slot_b of scene $scene_b"
ls -l "$out"
