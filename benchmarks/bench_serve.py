"""Load test of `roadwork serve` on loopback (issue 12, point 6).

`roadwork serve` as its own process (real uvicorn; ``--in-process``: a thread of this
process, ``server.background_server``, whose GIL the clients then share) on a free
127.0.0.1 port, serving a default-architecture cascade bundle (``--bundle`` / ``ROADWORK_HOME``'s latest, else a
tiny real one built as in bench_throughput); StreetVision-style requests (224 px JPEG at
PIL's default quality, base64) from 1, 4 and 16 concurrent clients (asyncio + httpx),
each level bounded by ``--requests`` and ``--seconds``. Reports throughput, p50 / p99
latency, the mean micro-batch size and any non-200 answers.

    .venv/bin/python benchmarks/bench_serve.py [--clients 1,4,16] [--requests 200]
        [--seconds 20] [--max-batch 16] [--max-wait-ms 5] [--engine auto]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from bench_throughput import find_bundle, jpeg_bytes


async def load_level(url: str, payloads: list[dict], clients: int, requests: int,
                     seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            t0 = time.perf_counter()
            r = await http.post("/predict", json=payloads[(k + sent) % len(payloads)])
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        await http.post("/predict", json=payloads[0])  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "requests": len(lat), "seconds": elapsed,
            "req_per_s": codes.get(200, 0) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "codes": codes}


def batch_totals(url: str) -> tuple[float, float]:
    """(images, model calls) so far, from the server's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    total = re.search(r"^roadwork_batch_size_sum (\S+)$", text, re.M)
    calls = re.search(r"^roadwork_batch_size_count (\S+)$", text, re.M)
    return float(total.group(1)), float(calls.group(1))


@contextlib.contextmanager
def serve_process(bundle: Path, args: argparse.Namespace):
    """`roadwork serve` in a child process on a free loopback port; yields its URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "roadwork_assets.cli", "serve", "--bundle", str(bundle),
           "--port", str(port), "--engine", args.engine, "--max-batch", str(args.max_batch),
           "--max-wait-ms", str(args.max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                print(f"engine: {httpx.get(f'{url}/healthz').json()['engine_reason']}", flush=True)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"roadwork serve did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def in_process(bundle: Path, args: argparse.Namespace):
    from roadwork_assets.core.export.predictor import BundlePredictor
    from roadwork_assets.core.export.server import ServeSettings, background_server, create_app

    predictor = BundlePredictor.from_dir(bundle, engine=args.engine)
    print(f"engine: {predictor.engine_reason}", flush=True)
    app = create_app(predictor, ServeSettings(max_batch=args.max_batch,
                                              max_wait_ms=args.max_wait_ms))
    with background_server(app) as url:
        yield url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=200, help="per level (bound)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per level (bound)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"])
    ap.add_argument("--bundle")
    ap.add_argument("--bundle-img-size", type=int, default=128)
    ap.add_argument("--in-process", action="store_true",
                    help="serve from a thread of this process (shares the clients' GIL)")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    payloads = [{"image": base64.b64encode(b).decode()} for b in jpeg_bytes(32, seed=5)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        serving = in_process if args.in_process else serve_process
        with serving(find_bundle(args, Path(tmp)), args) as url:
            for clients in (int(c) for c in args.clients.split(",")):
                images0, calls0 = batch_totals(url)
                row = asyncio.run(load_level(url, payloads, clients, args.requests, args.seconds))
                images1, calls1 = batch_totals(url)
                row["mean_batch"] = (images1 - images0) / max(1.0, calls1 - calls0)
                rows.append(row)
                print(f"{clients:3d} clients: {row['requests']:4d} requests in "
                      f"{row['seconds']:.1f} s, {row['req_per_s']:7.1f} req/s, p50 "
                      f"{row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms, mean batch "
                      f"{row['mean_batch']:.1f}, answers {row['codes']}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
