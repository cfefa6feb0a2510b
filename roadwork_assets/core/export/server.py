"""`roadwork serve`: a bundle behind HTTP, StreetVision-style.

``POST /predict`` with ``{"image": "<base64 JPEG/PNG/WebP>"}`` answers
``{"prediction": p}``: the bundle's served probability, which the validator binarises at
0.5 (np.round, 0.5 -> 0) to the policy's decision. Requests that arrive together are
answered by one model call (``MicroBatcher``: an asyncio queue, at most ``max_batch``
images, the first one waiting at most ``max_wait_ms`` for others). ``/healthz`` says
which bundle and engine serve; ``/metrics`` is Prometheus text (requests, latency,
decisions by stage, errors by reason, batch sizes).

Bad payloads are answered 4xx with a reason and never reach the model: a body over
``max_request_bytes`` (413), not JSON or no ``image`` string (422), empty (400), not
base64 (400), not an image or a decompression bomb (415 / 413, ``decode_image``'s
guards). Images are decoded on one worker thread (``decode_image`` touches the global
warnings filter) and the model runs on another, one batch at a time, so ONNX Runtime's
or torch's threads never compete with a second inference.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the string annotation here

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.export.predictor import DECISION_NAMES, BundlePredictor


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_request_bytes: int = 16 * 1024**2  # the base64 body; a 224 px JPEG is ~15 kB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_BYTES


class PayloadError(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


class ServeMetrics:
    """Prometheus series on the app's own registry (two apps in one process never clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("roadwork_requests", "predict requests answered, by HTTP status",
                                ["status"], registry=self.registry)
        self.latency = Histogram("roadwork_request_latency_seconds",
                                 "predict request latency (receive to answer)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 9),
                                 registry=self.registry)
        self.decisions = Counter("roadwork_decisions", "served decisions by stage",
                                 ["stage", "decision"], registry=self.registry)
        self.errors = Counter("roadwork_errors", "refused or failed requests by reason",
                              ["reason"], registry=self.registry)
        self.batch_size = Histogram("roadwork_batch_size", "images per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)


def decode_payload(body: bytes, settings: ServeSettings, img_size: int) -> np.ndarray:
    """Request body -> uint8 [3, S, S], or ``PayloadError`` saying what is wrong."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PayloadError(422, "not_json", 'the body is not JSON: send {"image": "<base64>"}') from None
    image = payload.get("image") if isinstance(payload, dict) else None
    if not isinstance(image, str):
        raise PayloadError(422, "no_image", 'the body has no "image" string: send '
                           '{"image": "<base64>"}')
    if image.startswith("data:") and "," in image:  # a data URL: data:image/jpeg;base64,...
        image = image.split(",", 1)[1]
    image = "".join(image.split())  # MIME-style line breaks are not an error
    if not image:
        raise PayloadError(400, "empty", "the image is empty")
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(400, "not_base64", "the image is not valid base64") from None
    if not raw:
        raise PayloadError(400, "empty", "the image decodes to zero bytes")
    try:
        picture = decode_image(raw, "request", max_pixels=settings.max_pixels,
                               max_bytes=settings.max_decode_bytes)
    except BadInputError as exc:
        too_big = "above the limit" in str(exc) or "decompression bomb" in str(exc)
        raise PayloadError(413 if too_big else 415, "too_large" if too_big else "not_image",
                           str(exc)) from None
    return to_model_array(picture, img_size)


@dataclass
class _Job:
    image: np.ndarray
    future: asyncio.Future


class MicroBatcher:
    """Collects queued images into batches of at most ``max_batch``; the first image of a
    batch waits at most ``max_wait_s`` for the others. ``batch_sizes`` records each call."""

    def __init__(self, predict, max_batch: int, max_wait_s: float, metrics: ServeMetrics) -> None:
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self.metrics = metrics
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="roadwork-model")
        self.batch_sizes: list[int] = []

    async def submit(self, image: np.ndarray) -> tuple[float, int, int]:
        job = _Job(image, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _collect(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            if not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=left)
            if not done:
                getter.cancel()  # Queue.get is only cancellable before it takes an item
            try:
                jobs.append(await getter)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # the server is shutting down
                    raise
                break
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self.batch_sizes.append(len(jobs))
            self.metrics.batch_size.observe(len(jobs))
            try:
                prob, decision, stage = await loop.run_in_executor(
                    self.executor, self.predict, np.stack([j.image for j in jobs]))
            except Exception as exc:  # one bad batch answers 500 and the server goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for i, job in enumerate(jobs):
                if not job.future.done():  # the client may have gone
                    job.future.set_result((float(prob[i]), int(decision[i]), int(stage[i])))


def create_app(predictor: BundlePredictor, settings: ServeSettings | None = None):
    """The FastAPI app serving ``predictor`` (``app.state.batcher``, ``app.state.metrics``)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    settings = settings or ServeSettings()
    metrics = ServeMetrics()
    batcher = MicroBatcher(predictor.predict_arrays, settings.max_batch,
                           settings.max_wait_ms / 1000.0, metrics)
    decoder = ThreadPoolExecutor(1, thread_name_prefix="roadwork-decode")
    img_size = predictor.bundle.manifest.img_size

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            batcher.executor.shutdown(wait=False)
            decoder.shutdown(wait=False)

    app = FastAPI(title="roadwork", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings

    def refuse(status: int, reason: str, detail: str, t0: float) -> JSONResponse:
        metrics.errors.labels(reason).inc()
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return JSONResponse({"error": reason, "detail": detail}, status_code=status)

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        body = await _read_limited(request, settings.max_request_bytes)
        if body is None:
            return refuse(413, "too_large", f"the body is over {settings.max_request_bytes} "
                          "bytes (--max-request-mb)", t0)
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(decoder, decode_payload, body, settings, img_size)
        except PayloadError as exc:
            return refuse(exc.status, exc.reason, exc.detail, t0)
        try:
            prob, decision, stage = await batcher.submit(image)
        except Exception as exc:
            return refuse(500, "inference", f"{type(exc).__name__}: {exc}", t0)
        metrics.decisions.labels(str(stage), DECISION_NAMES[decision]).inc()
        metrics.requests.labels("200").inc()
        metrics.latency.observe(time.perf_counter() - t0)
        return {"prediction": prob}

    @app.get("/healthz")
    async def healthz():
        m = predictor.bundle.manifest
        return {"status": "ok", "bundle_id": m.bundle_id, "policy_kind": m.policy_kind,
                "stages": m.stages, "engine": predictor.engine.name,
                "engine_reason": predictor.engine_reason}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_limited(request: Any, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes ``limit`` bytes (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def run_server(bundle_dir: Path, *, host: str, port: int, engine: str = "auto",
               settings: ServeSettings | None = None) -> int:
    """Load and check the bundle once, then serve until interrupted (uvicorn)."""
    import uvicorn

    predictor = BundlePredictor.from_dir(bundle_dir, engine=engine)
    m = predictor.bundle.manifest
    print(f"[roadwork] serving bundle {m.bundle_id} ({m.policy_kind}, {m.stages} stage(s)) "
          f"on http://{host}:{port}  engine: {predictor.engine_reason}", flush=True)
    uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level="warning")
    return 0


@contextlib.contextmanager
def background_server(app: Any, host: str = "127.0.0.1"):
    """Real uvicorn on an ephemeral loopback port in a thread; yields its base URL and
    stops it on exit (load tests, the serve benchmark)."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
