#!/usr/bin/env python3
"""Load client of scripts/lb-test.sh (Python standard library only).

`load`: a bounded mix of decompose and render requests from several concurrent clients to one
URL (nginx), each answer checked in full. `stream`: renders as server-sent events straight to
one replica; each creates a file once its first progress event arrives (the render is then in
flight, so the test may send SIGTERM) and must still end with a valid image. Both write a JSON
report and exit 1 unless every request got a complete, valid answer.
"""

import argparse
import base64
import functools
import http.client
import json
import os
import struct
import sys
import threading
import time
import urllib.parse
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Invalid(Exception):
    """An answer that is not what the request should get."""


def check_png(data):
    """Walks every chunk of a PNG (lengths, CRCs, IHDR first, IEND last) and inflates its
    image data, so a truncated or corrupted image is caught. Returns (width, height)."""
    if not data.startswith(PNG_SIGNATURE):
        raise Invalid("not a PNG (bad signature)")
    pos, chunks, idat = len(PNG_SIGNATURE), [], b""
    while pos < len(data):
        if pos + 12 > len(data):
            raise Invalid("PNG truncated inside a chunk header")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise Invalid(f"PNG truncated inside {kind!r}")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise Invalid(f"PNG chunk {kind!r} fails its CRC")
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    if not chunks or chunks[0] != b"IHDR" or chunks[-1] != b"IEND":
        raise Invalid(f"PNG chunks out of order: {chunks[:1]}...{chunks[-1:]}")
    try:
        zlib.decompress(idat)
    except zlib.error as e:
        raise Invalid(f"PNG image data does not inflate: {e}") from e
    return struct.unpack(">II", data[16:24])


def check_b64_png(text, what):
    try:
        return check_png(base64.b64decode(text, validate=True))
    except (ValueError, TypeError) as e:
        raise Invalid(f"{what}: not base64: {e}") from e


def parse_json(body):
    try:
        return json.loads(body)
    except ValueError as e:
        raise Invalid(f"incomplete or invalid JSON ({len(body)} bytes): {e}") from e


def check_decompose(body, want_slots):
    """A complete decompose answer: one image, K slots of the right byte size, a mask and an
    area per slot, a segmentation PNG."""
    doc = parse_json(body)
    images = doc.get("images")
    if not isinstance(images, list) or len(images) != 1:
        raise Invalid("decompose: expected one image")
    img = images[0]
    slots = img["slots"]
    k, d = slots["shape"]
    if len(base64.b64decode(slots["data"])) != 4 * k * d:
        raise Invalid("decompose: slot data does not match its shape")
    if want_slots is not None and k != want_slots:
        raise Invalid(f"decompose: {k} slots, the model has {want_slots}")
    if len(img["objects"]) != k:
        raise Invalid("decompose: not one object per slot")
    for obj in img["objects"]:
        check_b64_png(obj["mask"], f"mask of slot {obj['slot']}")
    check_b64_png(img["segmentation"], "segmentation")
    return doc


def check_render_json(body, seed):
    doc = parse_json(body)
    if len(doc.get("images", [])) != 1 or doc["seed"] != seed:
        raise Invalid("render: expected one image with the requested seed")
    return base64.b64decode(doc["images"][0]["png"])


class Client:
    """Sends requests to one base URL; one connection per request, so a connection that a
    dying server broke never leaks into the next request."""

    def __init__(self, url, timeout):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout

    def request(self, method, path, body=None, headers=None, reader=None):
        """Returns (status, headers, what `reader` makes of the response, by default its whole
        body); a broken or short response raises (IncompleteRead)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = reader(resp) if reader and resp.status == 200 else resp.read()
            return resp.status, resp.headers, data
        finally:
            conn.close()

    def post_json(self, path, doc, accept="application/json", reader=None):
        headers = {"content-type": "application/json", "accept": accept}
        return self.request("POST", path, json.dumps(doc).encode(), headers, reader)


def read_events(resp, on_progress):
    """Server-sent events of a render stream until the server ends it: [(event, data)]."""
    events, event, data = [], None, []
    for raw in resp:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and event:
            events.append((event, "\n".join(data)))
            if event == "progress" and len(events) == 1:
                on_progress()
            event, data = None, []
    return events


class Workload:
    """The requests of a run, each checked in full: decompose (JSON with masks), render as
    raw PNG, render as JSON. Renders cycle through a few seeds; equal seeds must give the same
    PNG, whichever replica made it, whatever it was batched with, raw or in JSON."""

    SEEDS = 3

    def __init__(self, client, images, slots, num_slots, steps):
        self.client, self.images, self.slots = client, images, slots
        self.num_slots, self.steps = num_slots, steps
        self.renders = {}  # seed -> digest of the first image with that seed
        self.mismatches = 0
        self.lock = threading.Lock()

    def run(self, i):
        """Request number i; returns its kind, raises unless the answer is right."""
        kind = ("decompose", "render-png", "decompose", "render-json")[i % 4]
        seed = i // 4 % self.SEEDS
        if kind == "decompose":
            doc = {"image": self.images[i % len(self.images)]}
            status, _, body = self.client.post_json("/decompose", doc)
        else:
            doc = {"slots": self.slots, "seed": seed, "steps": self.steps}
            accept = "image/png" if kind == "render-png" else "application/json"
            status, _, body = self.client.post_json("/render", doc, accept)
        if status != 200:
            raise Invalid(f"HTTP {status}: {body[:200]!r}")
        if kind == "decompose":
            check_decompose(body, self.num_slots)
        else:
            png = body if kind == "render-png" else check_render_json(body, seed)
            check_png(png)
            self.note_render(seed, zlib.crc32(png))
        return kind

    def run_stream(self, i, inflight):
        """Render i as a stream; touches `inflight`.i at its first progress event."""
        doc = {"slots": self.slots, "seed": i, "steps": self.steps}

        def reader(resp):
            return read_events(resp, lambda: open(f"{inflight}.{i}", "w").close())

        status, _, events = self.client.post_json("/render", doc, "text/event-stream", reader)
        if status != 200:
            raise Invalid(f"HTTP {status}: {events[:200]!r}")
        kinds = [e for e, _ in events]
        if "progress" not in kinds or kinds[-1] != "image" or "error" in kinds:
            raise Invalid(f"render stream: events {kinds[:3]}...{kinds[-2:]}")
        image = parse_json(events[-1][1])
        check_b64_png(image["png"], "streamed image")
        return "render-stream"

    def note_render(self, seed, digest):
        with self.lock:
            first = self.renders.setdefault(seed, digest)
            if first != digest:
                self.mismatches += 1


def percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_pool(count, clients, job, progress=None):
    """Runs job(i) for i in 0..count on `clients` threads; returns one record per request."""
    records, lock, next_i = [None] * count, threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= count:
                return
            start = time.monotonic()
            rec = {"i": i, "start": time.time()}
            try:
                rec["kind"] = job(i)
                rec["ok"] = True
            except Exception as e:  # every failure is counted and reported, none stops the run
                rec["ok"], rec["error"] = False, f"{type(e).__name__}: {e}"
            rec["seconds"] = time.monotonic() - start
            with lock:
                records[i] = rec
                done = sum(r is not None for r in records)
            if progress:
                tmp = progress + ".tmp"
                with open(tmp, "w") as f:
                    f.write(str(done))
                os.replace(tmp, progress)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summary(records):
    ok = [r for r in records if r["ok"]]
    lat = [r["seconds"] for r in ok]
    by_kind = {}
    for r in ok:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {
        "sent": len(records),
        "answered": len(ok),
        "failed": len(records) - len(ok),
        "by_kind": by_kind,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat) if lat else None,
        "errors": [f"#{r['i']}: {r['error']}" for r in records if not r["ok"]][:20],
    }


def read_images(paths):
    out = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        check_png(data)
        out.append(base64.b64encode(data).decode())
    return out


def prepare(client, images):
    """The model's slot count and a slot set to render, from one decompose."""
    status, _, body = client.post_json("/decompose", {"image": images[0]})
    if status != 200:
        raise SystemExit(f"preparing: decompose answered HTTP {status}: {body[:300]!r}")
    doc = check_decompose(body, None)
    slots = doc["images"][0]["slots"]
    return slots, slots["shape"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["load", "stream"])
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:18080")
    ap.add_argument("--image", action="append", required=True, help="PNG to decompose (repeat)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="model evaluations per render")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    ap.add_argument("--progress", help="file that holds the number of requests answered so far")
    ap.add_argument("--inflight", help="stream: prefix of the files marking renders in flight")
    ap.add_argument("--out", required=True, help="JSON report")
    args = ap.parse_args()

    client = Client(args.url, args.timeout)
    images = read_images(args.image)
    slots, k = prepare(client, images)
    work = Workload(client, images, slots, k, args.steps)
    if args.mode == "load":
        job = work.run
    else:
        job = functools.partial(work.run_stream, inflight=args.inflight)
    records = run_pool(args.requests, args.clients, job, args.progress)
    report = summary(records)
    report["render_seed_mismatches"] = work.mismatches
    report["records"] = records
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "records"}))
    ok = report["failed"] == 0 and work.mismatches == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
