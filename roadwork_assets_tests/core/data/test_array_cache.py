"""The embeddings cache is written batch by batch, read back memory-mapped, and refused
clearly when damaged; a killed or failed write leaves no half cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError
from roadwork_assets.core.artifacts import ArtifactRegistry, collect_dead_leftovers, read_npz
from roadwork_assets.core.data.array_cache import MappedRows, open_npz, streaming_npz
from roadwork_assets.core.data.transforms import load_model_arrays
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import (
    compute_embeddings,
    read_embeddings,
    train_checkpoint,
)


def _frame(folder: Path, n: int, size: int = 40) -> pd.DataFrame:
    """Random PNGs (odd items carry an orange square), as a split manifest."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 80, (size, size + 7, 3), dtype=np.uint8)
        if i % 2:
            arr[8:30, 8:30] = (255, 120, 0)
        Image.fromarray(arr).save(folder / f"im{i}.png")
        rows.append({"item_id": f"im{i}", "uri": str(folder / f"im{i}.png"), "label": i % 2})
    return pd.DataFrame(rows)


def _cfg(**kw) -> TrainerConfig:
    base = {"img_size": 32, "batch_size": 8, "epochs": 2, "threads": 1, "seed": 3}
    return TrainerConfig(**{**base, **kw})


def test_cache_is_a_memory_mapped_npz_of_every_row(tmp_path):
    frame = _frame(tmp_path / "img", 21)  # 21 rows, batches of 8: a short last batch
    dest = tmp_path / "train.npz"
    summary = compute_embeddings(frame, _cfg(), dest, "train", "dv", "a1")
    assert summary["shape"] == [21, 3, 32, 32]
    cache = read_embeddings(dest, "train")
    x = cache["features"]
    assert isinstance(x, MappedRows) and isinstance(x._mm, np.memmap)
    assert x.shape == (21, 3, 32, 32) and x.dtype == np.uint8
    whole = load_model_arrays(frame["uri"].tolist(), frame["item_id"].tolist(), 32)
    assert np.array_equal(np.asarray(x), whole)
    assert np.array_equal(x[np.array([20, 0, 9])], whole[[20, 0, 9]])
    # the same file is an ordinary npz: every metadata key is there for np.load readers
    plain = read_npz(dest)
    assert np.array_equal(plain["features"], whole)
    assert str(plain["split"]) == "train" and str(cache["kind"]) == "preprocessed_images"
    assert plain["item_ids"].tolist() == frame["item_id"].tolist()
    assert {"labels", "group_keys", "data_version", "assignment_version", "code_version",
            "backbone", "img_size", "n_views", "weights_sha256"} <= set(plain)


def _write_peak(tmp_path: Path, n: int) -> int:
    frame = _frame(tmp_path / f"img{n}", n)
    tracemalloc.start()
    try:
        compute_embeddings(frame, _cfg(img_size=48, batch_size=4), tmp_path / f"t{n}.npz",
                           "train", "dv", "a1")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writing_a_split_never_holds_the_whole_split(tmp_path):
    """Peak Python allocations while writing 64 vs 256 images: batches of 4 (27 KiB each,
    two in flight) plus bookkeeping, the same at both sizes; the whole 256-image split
    would be 1.7 MiB. (A fixed fraction of a small split was flaky: bookkeeping alone
    reached 0.51 of 64 images on CI.)"""
    small, large = _write_peak(tmp_path, 64), _write_peak(tmp_path, 256)
    whole_large = 256 * 3 * 48 * 48
    assert large < 0.25 * whole_large, (large, whole_large)
    # 4x the images, well under 4x the memory (the old path: 4x); the manifest table
    # and per-item lists still grow a little with N
    assert large < 1.6 * small, (small, large)


def test_a_pass_over_the_memmap_keeps_about_one_batch_resident(tmp_path):
    n, row = 256, (64, 256)  # 64 KiB rows, a 16 MiB array
    with streaming_npz(tmp_path / "big.npz") as out, out.rows("features", (n, *row), np.float32) as rows:
        for start in range(0, n, 32):
            rows.write(np.full((32, *row), start, dtype=np.float32))
    path = tmp_path / "big.npz"
    kept = open_npz(path, ("features",), "big", "rebuild")["features"]
    kept.release_bytes = float("inf")  # the pass without dropping pages, for contrast
    for start in range(0, n, 8):
        kept[start : start + 8]
    if _mapped_rss_kib(path) == 0:
        pytest.skip("no per-mapping Rss in /proc/self/smaps here")
    assert _mapped_rss_kib(path) >= 12 * 1024  # most of the 16 MiB stayed mapped
    kept.release()
    x = open_npz(path, ("features",), "big", "rebuild")["features"]
    resident = []
    for start in range(0, n, 8):
        assert float(x[start : start + 8][0, 0, 0]) == start // 32 * 32
        resident.append(_mapped_rss_kib(path))
    # pages are dropped after each read: well under one 512 KiB batch stays, not 16 MiB
    assert max(resident) <= 512, resident


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (Linux smaps)."""
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_training_from_the_memmap_equals_training_in_memory(tmp_path):
    frame = _frame(tmp_path / "img", 40)
    cfg = _cfg(epochs=2)
    for split, part in (("train", frame.iloc[:28]), ("val_select", frame.iloc[28:])):
        compute_embeddings(part.reset_index(drop=True), cfg, tmp_path / f"{split}.npz",
                           split, "dv", "a1")
    mapped = {s: read_embeddings(tmp_path / f"{s}.npz", s) for s in ("train", "val_select")}
    loaded = {s: read_npz(tmp_path / f"{s}.npz") for s in ("train", "val_select")}
    train_checkpoint(mapped, cfg, tmp_path / "mapped.pt")
    train_checkpoint(loaded, cfg, tmp_path / "loaded.pt")
    a = load_checkpoint(tmp_path / "mapped.pt")["model_state_dict"]
    b = load_checkpoint(tmp_path / "loaded.pt")["model_state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_cache_is_refused_naming_the_split(tmp_path, keep):
    frame = _frame(tmp_path / "img", 10)
    dest = ArtifactRegistry(tmp_path / "root").embedding_shard("val_calib", 0)
    compute_embeddings(frame, _cfg(), dest, "val_calib", "dv", "a1")
    data = dest.read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[val_calib\].*truncated or "
                       r"corrupt.*re-materialize embeddings for partition val_calib"):
        read_embeddings(dest, "val_calib")


def test_cache_whose_rows_are_missing_is_refused(tmp_path):
    """A features member shorter than its header declares (a zip rebuilt by hand)."""
    import zipfile

    dest = tmp_path / "train.npz"
    with zipfile.ZipFile(dest, "w") as zf:
        with zf.open("features.npy", "w") as fh:
            np.lib.format.write_array_header_2_0(
                fh, {"descr": "|u1", "fortran_order": False, "shape": (10, 3, 4, 4)})
            fh.write(b"\0" * 48)  # one row of ten
        with zf.open("labels.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros(10, np.int8))
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[train\].*re-materialize"):
        read_embeddings(dest, "train")


def test_missing_cache_says_to_materialize_it(tmp_path):
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[train\] is missing"):
        read_embeddings(tmp_path / "nope.npz", "train")


def test_io_manager_hands_training_the_memory_mapped_cache(tmp_path):
    from roadwork_assets.core.training.shards import ShardSpec, compute_embedding_shard
    from roadwork_assets.defs.io_manager import read_artifact, read_sharded

    reg = ArtifactRegistry(tmp_path / "root")
    compute_embedding_shard(_frame(tmp_path / "img", 6), _cfg(), reg.embedding_shard("train", 0),
                            "train", ShardSpec(1, 0), "dv", "a1")
    cache = read_artifact(reg, "embeddings", "0|train")
    assert isinstance(cache["features"], MappedRows) and len(cache["features"]) == 6
    merged = read_sharded(reg, "embeddings", ["0|train"])["train"]
    assert isinstance(merged["features"], MappedRows) and len(merged["features"]) == 6
    reg.embedding_shard("train", 0).write_bytes(reg.embedding_shard("train", 0).read_bytes()[:200])
    with pytest.raises(ArtifactIntegrityError, match=r"embeddings\[0\|train\]"):
        read_artifact(reg, "embeddings", "0|train")


def test_bad_image_mid_split_leaves_the_previous_cache_and_no_temporary(tmp_path):
    frame = _frame(tmp_path / "img", 20)
    dest = tmp_path / "cache" / "train.npz"
    compute_embeddings(frame, _cfg(), dest, "train", "dv", "a1")
    before = dest.read_bytes()
    Path(frame.loc[13, "uri"]).write_bytes(b"not an image")
    with pytest.raises(BadInputError, match="im13"):
        compute_embeddings(frame, _cfg(), dest, "train", "dv2", "a1")
    assert dest.read_bytes() == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["train.npz"]


def test_writer_refuses_a_short_array(tmp_path):
    with (pytest.raises(ValueError, match="3 of 5 rows"),
          streaming_npz(tmp_path / "x.npz") as out,
          out.rows("features", (5, 2), np.uint8) as rows):
        rows.write(np.zeros((3, 2), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_cache_only_a_collectable_temporary(tmp_path):
    dest = tmp_path / "embeddings" / "train.npz"
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from roadwork_assets.core.data.array_cache import streaming_npz
        with streaming_npz({str(dest)!r}) as out:
            with out.rows("features", (100, 1024), np.uint8) as rows:
                rows.write(np.ones((50, 1024), np.uint8))
                print("half", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not dest.exists()
    left = list(dest.parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".train.npz.tmp-")
    assert collect_dead_leftovers(tmp_path) == left and not any(dest.parent.iterdir())


def test_concatenated_rows_gather_across_parts_like_one_array(tmp_path):
    from roadwork_assets.core.data.array_cache import ConcatRows

    a = np.arange(5 * 4, dtype=np.uint8).reshape(5, 4)
    with streaming_npz(tmp_path / "b.npz") as out, out.rows("features", (3, 4), np.uint8) as rows:
        rows.write(100 + np.arange(12, dtype=np.uint8).reshape(3, 4))
    b = open_npz(tmp_path / "b.npz", ("features",), "b", "rebuild")["features"]
    both = ConcatRows([a, b])
    whole = np.concatenate([a, np.asarray(b)])
    assert len(both) == 8 and both.shape == (8, 4)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(both[order], whole[order.numpy()])
    assert np.array_equal(both[3:7], whole[3:7])
