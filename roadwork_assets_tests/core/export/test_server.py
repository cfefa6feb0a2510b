"""`roadwork serve` on a real tiny cascade bundle (FastAPI's TestClient runs the real app
and its lifespan): StreetVision-style answers, every bad payload a 4xx with a reason and
the server still answering, Prometheus metrics, micro-batching of concurrent requests,
and real uvicorn on loopback under a bounded load."""

from __future__ import annotations

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.export.predictor import BundlePredictor
from roadwork_assets.core.export.server import ServeSettings, background_server, create_app

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def _jpeg_b64(seed: int = 0, size: int = 224) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")  # PIL default quality 75, as the validator
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def predictor(cascade_bundle) -> BundlePredictor:
    return BundlePredictor.from_dir(cascade_bundle.directory, engine="torch")


def _client(predictor, **settings):
    return fastapi_testclient.TestClient(create_app(predictor, ServeSettings(**settings)))


def test_predict_answers_the_served_probability(predictor):
    with _client(predictor) as client:
        image = _jpeg_b64(1)
        response = client.post("/predict", json={"image": image})
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"prediction"} and 0.0 <= body["prediction"] <= 1.0
        array = to_model_array(decode_image(base64.b64decode(image), "x"),
                               predictor.bundle.manifest.img_size)
        prob, decision, _stage = predictor.predict_arrays(array[None])
        assert body["prediction"] == pytest.approx(float(prob[0]), abs=1e-12)
        assert int(np.round(body["prediction"])) == (int(decision[0]) == 1)
        wrapped = "\n".join(image[i:i + 76] for i in range(0, len(image), 76))
        for variant in (wrapped, "data:image/jpeg;base64," + image):
            assert client.post("/predict", json={"image": variant}).json() == body
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["engine"] == "torch"
        assert health["bundle_id"] == predictor.bundle.manifest.bundle_id


def _bomb_png() -> str:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # compresses to a few kB
    return base64.b64encode(buf.getvalue()).decode()


BAD = {
    "not_json": (b"{not json", 422, "not_json"),
    "no_image_key": (b'{"img": "abc"}', 422, "no_image"),
    "image_not_a_string": (b'{"image": 5}', 422, "no_image"),
    "json_list": (b'["image"]', 422, "no_image"),
    "empty": (b'{"image": ""}', 400, "empty"),
    "not_base64": (b'{"image": "@@not base64@@"}', 400, "not_base64"),
    "not_an_image": (b'{"image": "' + base64.b64encode(b"hello, not a picture") + b'"}', 415,
                     "not_image"),
    "truncated_jpeg": (b'{"image": "' + _jpeg_b64(2)[:200].encode() + b'"}', 415, "not_image"),
    "huge_body": (b'{"image": "' + b"A" * 40_000 + b'"}', 413, "too_large"),
    "pixel_bomb": (b'{"image": "' + _bomb_png().encode() + b'"}', 413, "too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_payload_is_refused_with_a_reason_and_the_server_goes_on(case, predictor):
    body, status, reason = BAD[case]
    with _client(predictor, max_request_bytes=32_768, max_pixels=1_000_000) as client:
        response = client.post("/predict", content=body,
                               headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        assert response.json()["error"] == reason and response.json()["detail"]
        assert client.post("/predict", json={"image": _jpeg_b64(3, 64)}).status_code == 200
        assert f'roadwork_errors_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text


def test_metrics_count_requests_latency_decisions_and_errors(predictor):
    with _client(predictor) as client:
        for seed in range(3):
            assert client.post("/predict", json={"image": _jpeg_b64(seed, 96)}).status_code == 200
        assert client.post("/predict", json={"image": ""}).status_code == 400
        text = client.get("/metrics").text
    assert 'roadwork_requests_total{status="200"} 3.0' in text
    assert 'roadwork_requests_total{status="400"} 1.0' in text
    assert "roadwork_request_latency_seconds_count 4.0" in text
    served = re.findall(r'roadwork_decisions_total\{decision="(\w+)",stage="(\d)"\} (\S+)', text)
    assert sum(float(n) for *_, n in served) == 3.0
    assert {s for _, s, _ in served} <= {"1", "2"}
    assert 'roadwork_errors_total{reason="empty"} 1.0' in text
    assert "roadwork_batch_size_count" in text


def test_concurrent_requests_share_one_model_call(predictor):
    """Four requests sent together, a batch of at most 4 and a long wait: one call."""
    with _client(predictor, max_batch=4, max_wait_ms=5000) as client:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: client.post("/predict", json={"image": _jpeg_b64(s)}),
                                    range(4)))
        assert time.perf_counter() - t0 < 5.0  # a full batch does not wait out max_wait
        assert [a.status_code for a in answers] == [200] * 4
        assert client.app.state.batcher.batch_sizes == [4]


def test_a_failed_model_call_answers_500_and_the_server_goes_on(predictor, monkeypatch):
    with _client(predictor) as client:
        batcher = client.app.state.batcher
        real = batcher.predict
        monkeypatch.setattr(batcher, "predict", lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
        response = client.post("/predict", json={"image": _jpeg_b64(0, 64)})
        assert response.status_code == 500 and response.json()["error"] == "inference"
        monkeypatch.setattr(batcher, "predict", real)
        assert client.post("/predict", json={"image": _jpeg_b64(0, 64)}).status_code == 200


def test_real_uvicorn_on_loopback_under_a_bounded_load(predictor):
    httpx = pytest.importorskip("httpx")
    app = create_app(predictor, ServeSettings(max_batch=8, max_wait_ms=20))
    payloads = [{"image": _jpeg_b64(s)} for s in range(4)]
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").json()["status"] == "ok"

        def one_client(k: int) -> list[int]:
            return [client.post("/predict", json=payloads[(k + i) % 4]).status_code
                    for i in range(5)]

        with ThreadPoolExecutor(4) as pool:
            codes = [c for cs in pool.map(one_client, range(4)) for c in cs]
        assert codes == [200] * 20
        sizes = app.state.batcher.batch_sizes
        assert sum(sizes) == 20 and max(sizes) <= 8


def test_roadwork_serve_cli_passes_its_settings_to_the_app(cascade_bundle, monkeypatch, capsys):
    import uvicorn

    from roadwork_assets.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", "--bundle", str(cascade_bundle.directory), "--port", "8123",
                 "--engine", "torch", "--max-batch", "3", "--max-wait-ms", "7",
                 "--max-request-mb", "0.5"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    settings = seen["app"].state.settings
    assert (settings.max_batch, settings.max_wait_ms, settings.max_request_bytes) == (
        3, 7.0, 512 * 1024)
    assert "serving bundle" in capsys.readouterr().out
    with fastapi_testclient.TestClient(seen["app"]) as client:
        assert client.get("/healthz").json()["engine"] == "torch"
