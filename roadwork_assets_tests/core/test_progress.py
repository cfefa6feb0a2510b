"""Progress lines: throttled, with rate and ETA, from a fake long loop and from real
core functions (default-dataset generation, image decoding, embedding)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from roadwork_assets.core.progress import ProgressReporter, format_duration, progress_line

LINE = re.compile(r"^(?P<stage>[^:]+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) "
                  r"(?P<rate>[\d.]+)/s (?P<tail>ETA \S+|done in \S+)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_long_loop_reports_rate_and_eta_at_most_every_few_seconds():
    """10,000 items at 100 items/s (0.01 s each, 100 s in all), reporter every 5 s:
    the first call, one line per 5 s, and the last: 21 lines, not 10,000."""
    clock, lines = FakeClock(), []
    progress = ProgressReporter(emit=lines.append, every_s=5.0, clock=clock)
    total = 10_000
    for done in range(total + 1):
        progress("embed", done, total)
        clock.now += 0.01
    assert 15 <= len(lines) <= 22, lines
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    middle = parsed[len(parsed) // 2]
    assert abs(float(middle["rate"]) - 100.0) < 1.0
    # ETA = what is left at the measured rate
    left_s = (total - int(middle["done"])) / 100.0
    assert middle["tail"] == f"ETA {format_duration(left_s)}"
    assert parsed[0]["tail"] == "ETA ?"  # nothing done yet
    assert lines[-1] == "embed: 10000/10000 (100%) 100.0/s done in 1m40s"


def test_a_reused_stage_name_restarts_its_clock_and_stages_are_independent():
    clock, lines = FakeClock(), []
    progress = ProgressReporter(emit=lines.append, every_s=60.0, clock=clock)
    for _epoch in range(2):  # the same name again: a fresh clock, so a fresh first line
        for done in range(0, 11):
            progress("logits", done, 10)
            progress("other", done, 10)
            clock.now += 1.0
    assert [line for line in lines if line.startswith("logits")] == [
        "logits: 0/10 (0%) 0.0/s ETA ?", "logits: 10/10 (100%) 1.0/s done in 10s",
        "logits: 0/10 (0%) 0.0/s ETA ?", "logits: 10/10 (100%) 1.0/s done in 10s"]
    assert len([line for line in lines if line.startswith("other")]) == 4


def test_line_format():
    assert progress_line("train epochs", 3, 10, 30.0) == "train epochs: 3/10 (30%) 0.1/s ETA 1m10s"
    # slower than one item per 10 s: time per item, never "0.0/s"
    assert progress_line("train epochs", 4, 14, 300.0) == (
        "train epochs: 4/14 (29%) 1m15s/item ETA 12m30s")
    assert format_duration(7322) == "2h02m"


def test_default_dataset_and_decoding_report_progress(tmp_path):
    from roadwork_assets.core.data.ingest import ingest_images
    from roadwork_assets.core.data.sources import load_source
    from roadwork_assets.core.data.synthetic import generate_default_dataset
    from roadwork_assets.core.data.transforms import load_model_arrays

    calls: list[tuple[str, int, int]] = []

    def record(stage: str, done: int, total: int) -> None:
        calls.append((stage, done, total))

    manifest = generate_default_dataset(tmp_path / "d", n_images=12, image_size=32,
                                        progress=record)
    gen = [c for c in calls if c[0] == "generate default dataset"]
    assert gen[-1] == ("generate default dataset", 12, 12)
    assert [c[1] for c in gen] == sorted(c[1] for c in gen)

    records = load_source(str(manifest), cache_dir=tmp_path / "cache")
    calls.clear()
    ingest_images(records, progress=record)
    assert calls[0] == ("decode images", 0, 12) and calls[-1] == ("decode images", 12, 12)

    calls.clear()
    frame = pd.DataFrame({"uri": records["uri"], "item_id": records["item_id"]})
    arrays = load_model_arrays(frame["uri"].tolist(), frame["item_id"].tolist(), 16,
                               progress=record)
    assert arrays.shape == (12, 3, 16, 16) and arrays.dtype == np.uint8
    assert calls[-1] == ("decode + resize", 12, 12)


def test_logits_report_progress_per_batch_through_a_reporter():
    import torch

    from roadwork_assets.core.models.classifier import build_classifier
    from roadwork_assets.core.training.trainer import predict_view_logits

    model = build_classifier("test_resnet.r160_in1k", img_size=32)
    images = np.random.default_rng(0).integers(0, 255, (10, 3, 32, 32), dtype=np.uint8)
    clock, lines = FakeClock(), []

    def tick_emit(line: str) -> None:
        lines.append(line)

    reporter = ProgressReporter(emit=tick_emit, every_s=0.0, clock=clock)
    predict_view_logits(model, images, n_views=1, batch_size=4, device=torch.device("cpu"),
                        progress=reporter)
    assert [line.split(" ")[1] for line in lines] == ["0/10", "4/10", "8/10", "10/10"]
    assert all(LINE.match(line) for line in lines), lines


def test_near_duplicate_confirmation_reports_progress():
    from roadwork_assets.core.data.similarity import NearDuplicateRule, confirm_pairs

    rng = np.random.default_rng(0)
    thumbs = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    i, j = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    calls: list[tuple[str, int, int]] = []
    confirm_pairs(thumbs, i, j, NearDuplicateRule(), lambda *c: calls.append(c))
    assert calls[0] == ("confirm near-duplicate pairs", 0, 4)
    assert calls[-1] == ("confirm near-duplicate pairs", 4, 4)
