"""Peak RSS of the embedding + training path at two dataset sizes (target: ratio <= 1.25).

    .venv/bin/python benchmarks/bench_memory.py [--sizes 3000 12000] [--img-size 224]
        [--source-size 320] [--distinct 1000] [--phases embed train logits]
        [--epochs 1] [--device auto] [--work /tmp/bench_memory] [--out result.json]

Each size runs in a fresh child process (``--child N``) that does, on N images split
80/20 into train / val_select, the steps of ``roadwork run`` whose memory could grow
with the dataset, through the same core functions the Dagster assets call:

- ``embed``: ``compute_embeddings`` for both splits (end_to_end mode: decode + resize on
  the thread pool, the uint8 [N, 3, S, S] cache written batch by batch);
- ``train``: ``train_checkpoint`` for ``--epochs`` epochs over the caches as the IO
  manager hands them over (``read_embeddings``: memory-mapped), val_select scored every
  epoch, checkpoint written;
- ``logits``: ``compute_logits`` of both splits from that checkpoint.
- ``legacy_embed`` (for contrast, alone): what ``compute_embeddings`` did before the
  streaming cache: ``load_model_arrays`` of the whole split, then ``atomic_write_npz``.

The child reports ``ru_maxrss`` (peak resident set, file-backed mapped pages included)
after each step; the parent prints them for every size and the ratio largest/smallest.
Not measured: ingest, dedup, policies, export (their inputs are tables, not pixels).

Data: ``--distinct`` scenes from the project's synthetic generator at ``--source-size``
px, repeated as hard links up to the largest size (every file is decoded; identical
bytes change nothing about memory). The model is the default end_to_end backbone
(timm ``test_resnet``); ``--device auto`` trains on a GPU when there is one.

Measured 2026-11-26 (img_size 224, batch 64, 1 epoch; peak RSS in MiB; about 815 MiB of
it is the interpreter with torch/timm/sklearn/pandas imported, before any image):

    where                        3,000 images   12,000 images   ratio
    H200 host, embed+train+logits   1843            1818         0.99
      same, --no-release            2259            3540         1.57
    2 loaded CPU cores, embed        902             904         1.00
      legacy_embed (old path)       1589            3658         2.30

The H200 host's numbers include the CUDA context; its embed step alone was 866 / 869.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

MIB = 1024.0  # ru_maxrss is in KiB on Linux


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def rss_now_mib() -> dict[str, float]:
    """Current resident memory by kind (Linux /proc/self/status): anonymous (heap,
    tensors) vs file-backed (mapped libraries and the memory-mapped cache)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / MIB, 1)
    except OSError:
        pass
    return out


def prepare(work: Path, n_max: int, distinct: int, source_size: int) -> Path:
    """``work/files.csv``: n_max image files (hard links onto ``distinct`` scenes)."""
    from roadwork_assets.core.data.synthetic.dataset import generate_default_dataset

    table = work / f"files_{n_max}_{distinct}_{source_size}.csv"
    if table.exists():
        return table
    manifest = generate_default_dataset(work / f"scenes_{distinct}_{source_size}",
                                        n_images=distinct, image_size=source_size)
    scenes = pd.read_csv(manifest)
    folder = work / f"files_{distinct}_{source_size}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_max):
        src = scenes.iloc[i % len(scenes)]
        dest = folder / f"img_{i:06d}.jpg"
        if not dest.exists():
            os.link(manifest.parent / src["path"], dest)
        rows.append({"uri": str(dest), "item_id": f"img_{i:06d}", "label": int(src["label"]),
                     "group_key": f"g{i:06d}"})
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def child(args: argparse.Namespace) -> dict:
    """One size, in this process: the steps named in ``--phases``; peak RSS after each."""
    from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256
    from roadwork_assets.core.training.checkpoint import load_checkpoint
    from roadwork_assets.core.training.config import TrainerConfig
    from roadwork_assets.core.training.pipeline import (
        compute_embeddings,
        compute_logits,
        read_embeddings,
        train_checkpoint,
    )

    n = args.child
    if args.no_release:  # ablation: keep every mapped page of the cache resident
        from roadwork_assets.core.data.array_cache import MappedRows

        MappedRows.release_bytes = float("inf")
    frame = pd.read_csv(args.table).iloc[:n]
    cut = int(n * 0.8)
    splits = {"train": frame.iloc[:cut].reset_index(drop=True),
              "val_select": frame.iloc[cut:].reset_index(drop=True)}
    reg = ArtifactRegistry(Path(args.work) / f"run_{n}")
    cfg = TrainerConfig(img_size=args.img_size, epochs=args.epochs, device=args.device,
                        batch_size=args.batch_size, threads=args.threads)
    out: dict = {"n": n, "start_mib": peak_rss_mib(), "phases": {}}

    def mark(name: str, t0: float) -> None:
        out["phases"][name] = {"peak_rss_mib": round(peak_rss_mib(), 1),
                               "seconds": round(time.perf_counter() - t0, 1), **rss_now_mib()}
        print(f"[child {n}] {name}: {out['phases'][name]}", file=sys.stderr, flush=True)

    if "legacy_embed" in args.phases:
        from roadwork_assets.core.artifacts import atomic_write_npz
        from roadwork_assets.core.data.transforms import load_model_arrays

        t0 = time.perf_counter()
        for split, part in splits.items():
            whole = load_model_arrays(part["uri"].tolist(), part["item_id"].tolist(),
                                      args.img_size)
            atomic_write_npz(reg.embedding_shard(split, 0), features=whole,
                             labels=part["label"].to_numpy())
            del whole
        mark("legacy_embed", t0)
        out["peak_rss_mib"] = round(peak_rss_mib(), 1)
        return out
    if "embed" in args.phases:
        t0 = time.perf_counter()
        for split, part in splits.items():
            compute_embeddings(part, cfg, reg.embedding_shard(split, 0), split, "bench", "bench")
        out["cache_mib"] = round(sum(reg.embedding_shard(s, 0).stat().st_size for s in splits) / 2**20, 1)
        mark("embed", t0)
    caches = {s: read_embeddings(reg.embedding_shard(s, 0), s) for s in splits}
    if "train" in args.phases:
        t0 = time.perf_counter()
        train_checkpoint(caches, cfg, reg.checkpoint)
        mark("train", t0)
    if "logits" in args.phases:
        t0 = time.perf_counter()
        payload, sha = load_checkpoint(reg.checkpoint), file_sha256(reg.checkpoint)
        for split, cache in caches.items():
            compute_logits(payload, cache, split, reg.logits(split), sha, override=cfg)
        mark("logits", t0)
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 12000])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--source-size", type=int, default=320)
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--phases", nargs="+", default=["embed", "train", "logits"],
                        choices=["embed", "train", "logits", "legacy_embed"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--work", default="/tmp/bench_memory")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-release", action="store_true",
                        help="ablation: never drop the cache's mapped pages while reading")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--table", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)), flush=True)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = prepare(work, max(args.sizes), args.distinct, args.source_size)
    print(f"data: {max(args.sizes)} files over {args.distinct} scenes at {args.source_size} px "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--table", str(table),
               "--work", str(work), "--img-size", str(args.img_size), "--epochs",
               str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device,
               "--phases", *args.phases]
        if args.no_release:
            cmd.append("--no-release")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\nimg_size {args.img_size}, batch {args.batch_size}, phases {args.phases}, "
          f"device {args.device}{', NO page release' if args.no_release else ''}; peak RSS (ru_maxrss of a fresh child process, MiB):")
    print(f"{'images':>8} {'cache MiB':>10} " + " ".join(f"{p:>14}" for p in args.phases)
          + f" {'peak':>8}")
    for r in results:
        cells = " ".join(f"{r['phases'][p]['peak_rss_mib']:>8.0f} ({r['phases'][p]['seconds']:>3.0f}s)"
                         for p in args.phases)
        print(f"{r['n']:>8} {r.get('cache_mib', float('nan')):>10.0f} {cells} "
              f"{r['peak_rss_mib']:>8.0f}")
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    verdict = "OK" if ratio <= 1.25 else "ABOVE TARGET"
    print(f"ratio peak({results[-1]['n']}) / peak({results[0]['n']}) = {ratio:.3f} "
          f"(target <= 1.25: {verdict})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results,
                                              "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
