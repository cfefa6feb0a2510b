"""The validator simulator in the test report: named rows, each one way of answering the
validator with a bundle, scored side by side on the same augmented val_test images.

A row is a name, a description and a builder: ``ServedModels -> predict_fn`` (a list of
decoded 224x224 validator images -> one P(roadwork) each, binarised at 0.5 by the
validator). Adding a row (the cascade as served, stage 2 alone at 0.5) is one entry in
``ROWS``. Rows that read stage 1 share one forward pass per batch (``Stage1Views``).

Cost, bounded by ``max_images`` (a seeded subsample of whole groups): every image is
decoded once per level (4x; memory holds one original at a time, not 600 decoded
photos), augmented once per level (L1-L3 rotate the full-size original) and predicted
by stage 1 once per level for all stage-1 rows together, at the views its policy reads
(one; every view for a gate). A 12 MP JPEG costs about 2 s over the four levels on one
core (decode 0.08 s each time, L0 0.05 s, L1-L3 0.55-0.6 s each), so 600 of them about
20 minutes before the model; a 2 MP frame about a sixth of that. The reward windows add
about 0.1 s per row, the closed form about 1 s once per process. Measured
(``ValidatorSimulation.seconds``): 84 val_test images of 64 px and the tiny test model
on 2 CPU cores, 1.4-1.8 s in all, about 5 ms per (image, level); several times that
when other work shares the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.contracts.validator_schemas import ValidatorRow, ValidatorSimulation
from roadwork_assets.core.calibration.policies import apply_policy, policy_probability
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.evaluation.validator import LEVELS, simulate_many
from roadwork_assets.core.export.bundle import Bundle
from roadwork_assets.core.training.pipeline import model_from_checkpoint
from roadwork_assets.core.training.trainer import predict_view_logits

PredictFn = Callable[[list[Image.Image]], np.ndarray]
BATCH_SIZE = 64


def _views_read(bundle: Bundle) -> int:
    """Views the policy reads: a gate reads every view's disagreement, the others the main
    view only. View k's logits do not depend on the other views (eval mode), so computing
    fewer serves the same answers as ``BundlePredictor`` at a fraction of the cost."""
    if bundle.policy.kind == "gate":
        return bundle.manifest.n_views
    return min(bundle.policy.main_view + 1, bundle.manifest.n_views)


class Stage1Views:
    """Stage 1's view logits [N, V, 2] of one validator batch (V: the views its policy
    reads), computed once and shared
    by every row that reads them (the same batch list object is passed to each row)."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu",
                 batch_size: int = BATCH_SIZE) -> None:
        self.model = bundle.model if bundle.model is not None else \
            model_from_checkpoint(bundle.checkpoint)[0]
        self.img_size = bundle.manifest.img_size
        self.n_views = _views_read(bundle)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._batch: list[Image.Image] | None = None  # held, so its id cannot be reused
        self._logits = np.empty((0, self.n_views, 2), np.float32)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        if images is not self._batch:
            arrays = np.stack([to_model_array(im, self.img_size) for im in images])
            self._logits = predict_view_logits(self.model, arrays, n_views=self.n_views,
                                               batch_size=self.batch_size, device=self.device)
            self._batch = images
        return self._logits


@dataclass
class ServedModels:
    """What rows read: the bundle's policy and stage 1 (later: stage 2, the cascade)."""

    bundle: Bundle
    stage1: Stage1Views

    @classmethod
    def of(cls, bundle: Bundle, *, device: str = "cpu") -> ServedModels:
        return cls(bundle=bundle, stage1=Stage1Views(bundle, device=device))


@dataclass(frozen=True)
class Row:
    description: str
    build: Callable[[ServedModels], PredictFn]


def _stage1_served(m: ServedModels) -> PredictFn:
    return lambda images: apply_policy(m.bundle.policy, m.stage1(images))[1]


def _single_view(m: ServedModels) -> PredictFn:
    return lambda images: policy_probability(m.bundle.policy, m.stage1(images))


# name -> row; the report keeps this order
ROWS: dict[str, Row] = {
    "stage1_served": Row(
        "the bundle's policy as served: its remapped probability (a deferral is emitted "
        "as roadwork), binarised at 0.5 by the validator", _stage1_served),
    "single_view_0.5": Row(
        "the calibrated single-view (main view) model probability at 0.5, no exit policy: "
        "what the reference miner does", _single_view),
}


def sample_by_group(groups: Sequence[str], max_images: int, seed: int) -> np.ndarray:
    """Sorted row indices of whole groups taken in a seeded random order while they fit
    in ``max_images`` (a group that would overflow is skipped, smaller ones still fill);
    every row when they all fit. Whole groups: copies of one photo or one scene are
    never split between used and unused."""
    groups = np.asarray([str(g) for g in groups], dtype=object)
    if max_images >= groups.size:
        return np.arange(groups.size)
    names, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    order = np.random.default_rng([seed, 7]).permutation(names.size)
    chosen, total = [], 0
    for g in order:
        if total + sizes[g] <= max_images:
            chosen.append(g)
            total += sizes[g]
        if total == max_images:
            break
    if not chosen:  # every group is bigger than the cap: part of one group
        return np.sort(np.flatnonzero(inverse == order[0])[:max_images])
    return np.sort(np.flatnonzero(np.isin(inverse, chosen)))


class LazyImages(Sequence):
    """Decodes ``uris[i]`` (``decode_image``: its pixel and memory limits) on access, so
    memory holds one original at a time; the simulator reads each image once per level."""

    def __init__(self, uris: Sequence[str], items: Sequence[str]) -> None:
        self.uris, self.items = list(uris), list(items)

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i):  # type: ignore[override]
        return decode_image(Path(self.uris[i]), str(self.items[i]))


def simulate_rows(
    uris: Sequence[str],
    items: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[str],
    predict_fns: Mapping[str, tuple[str, PredictFn]],
    *,
    max_images: int,
    seed: int = 0,
    flips: bool = True,
    n_windows: int = 20000,
) -> ValidatorSimulation:
    """Run the validator simulator for every row on a by-group subsample of the images
    (at most ``max_images``). ``predict_fns``: name -> (description, predict_fn)."""
    t0 = time.perf_counter()
    labels = np.asarray(labels).astype(np.int64)
    keep = sample_by_group(groups, max_images, seed)
    y = labels[keep]
    if np.unique(y).size < 2:
        raise InsufficientDataError(
            f"the validator simulator's subsample of {keep.size} val_test images holds one "
            f"class only ({max_images=} of {labels.size}): raise exit_policy.validator_images")
    images = LazyImages([uris[i] for i in keep], [items[i] for i in keep])
    fns = {name: fn for name, (_, fn) in predict_fns.items()}
    reports = simulate_many(images, y, fns, seed=seed, flips=flips, n_windows=n_windows,
                            batch_size=BATCH_SIZE)
    seconds = time.perf_counter() - t0
    rows = [ValidatorRow(name=name, description=predict_fns[name][0],
                         per_level=rep.per_level, reward=rep.reward)
            for name, rep in reports.items()]
    return ValidatorSimulation(
        seed=seed, levels=list(LEVELS), flips=flips, n_images=int(keep.size),
        n_positive=int(y.sum()), n_available=int(labels.size), max_images=max_images,
        n_groups=int(np.unique(np.asarray([str(groups[i]) for i in keep])).size),
        seconds=seconds, seconds_per_answer=seconds / (keep.size * len(LEVELS)), rows=rows)


def simulate_bundle(bundle: Bundle, uris, items, labels, groups, *, max_images: int,
                    seed: int = 0, flips: bool = True, device: str = "cpu",
                    rows: Sequence[str] | None = None) -> ValidatorSimulation:
    """Every row of ``ROWS`` (or the named ones) for ``bundle``, on the same images."""
    served = ServedModels.of(bundle, device=device)
    names = list(ROWS) if rows is None else list(rows)
    fns = {name: (ROWS[name].description, ROWS[name].build(served)) for name in names}
    return simulate_rows(uris, items, labels, groups, fns, max_images=max_images, seed=seed,
                         flips=flips)


def rows_table(sim: ValidatorSimulation) -> str:
    """Markdown: one line per row, MCC / accuracy per level, the reward and its closed form."""
    levels = [f"L{lv}" for lv in sim.levels]
    head = ("| row | " + " | ".join(f"{lv} MCC / acc" for lv in levels)
            + " | reward (simulated, 95% MC interval) | reward (closed form) |")
    lines = [head, "|---" * (len(levels) + 3) + "|"]
    for r in sim.rows:
        cells = [f"{m.mcc:.3f} / {m.accuracy:.3f}" for m in r.per_level]
        rw = r.reward
        exp = "—" if rw.expected is None else f"{rw.expected:.3f}"
        lines.append(f"| {r.name} | " + " | ".join(cells)
                     + f" | {rw.mean:.3f} [{rw.ci_low:.3f}, {rw.ci_high:.3f}] | {exp} |")
    return "\n".join(lines) + (
        f"\n\n{sim.n_images} of {sim.n_available} val_test images ({sim.n_groups} groups, "
        f"{sim.n_positive} roadwork), each at L0-L3, flips={sim.flips}, seed {sim.seed}; "
        f"{sim.seconds:.1f} s ({1000 * sim.seconds_per_answer:.1f} ms per image and level, "
        "all rows). Interval: Monte-Carlo error of the window simulation only.")


def closing_line(sim: ValidatorSimulation) -> str:
    """What ``roadwork run`` prints: 'validator reward (simulated, L0-L3): row m [lo, hi]; ...'."""
    parts = [f"{r.name} {r.reward.mean:.3f} [{r.reward.ci_low:.3f}, {r.reward.ci_high:.3f}]"
             for r in sim.rows]
    levels = f"L{min(sim.levels)}-L{max(sim.levels)}"
    return (f"validator reward (simulated, {levels}): " + "; ".join(parts)
            + f" ({sim.n_images} val_test images, flips={sim.flips})")
