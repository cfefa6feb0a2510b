"""The validator simulator in the test report: named rows, each one way of answering the
validator with a bundle, scored side by side on the same augmented val_test images.

A row is a name, a description, a builder ``ServedModels -> predict_fn`` (a list of
decoded 224x224 validator images -> one P(roadwork) each, binarised at 0.5 by the
validator) and the reason it does not apply to a bundle, if any (a stage-1 bundle has no
stage 2: ``cascade_served`` and ``stage2_0.5`` are left out, listed in
``ValidatorSimulation.skipped``). Rows: ``cascade_served`` (stage 1 on every image, stage 2
on the routed ones), ``stage1_served`` (the ``thresholds`` policy on the stage-1 model for a
cascade bundle; the bundle's policy otherwise), ``single_view_0.5``, ``stage2_0.5``. Rows
that read stage 1 share one forward pass per batch (``Stage1Views``); stage 2 runs at most
once per image and batch, shared by the cascade and stage2_0.5 (``Stage2Logits``): ten
crops through the stage-1 network, so about ten stage-1 passes per image.

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

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.policy_schemas import PolicyParams
from roadwork_assets.contracts.validator_schemas import ValidatorRow, ValidatorSimulation
from roadwork_assets.core.calibration.cascade import apply_cascade, cascade_stage2_probability
from roadwork_assets.core.calibration.policies import apply_policy, policy_probability
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.evaluation.validator import LEVELS, simulate_many
from roadwork_assets.core.export.bundle import Bundle
from roadwork_assets.core.models.multiview import MultiviewModel
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.multiview import predict_stage2_logits, stage2_model
from roadwork_assets.core.training.pipeline import model_from_checkpoint
from roadwork_assets.core.training.trainer import predict_view_logits

PredictFn = Callable[[list[Image.Image]], np.ndarray]
BATCH_SIZE = 64


def _views_read(bundle: Bundle, *policies: PolicyParams | None) -> int:
    """Views the policies read: a gate reads every view's disagreement, the others the main
    view only. View k's logits do not depend on the other views (eval mode), so computing
    fewer serves the same answers as ``BundlePredictor`` at a fraction of the cost."""
    n = bundle.manifest.n_views
    reads = [n if p.kind == "gate" else min(p.main_view + 1, n)
             for p in (bundle.policy, *policies) if p is not None]
    return max(reads)


class Stage1Views:
    """Stage 1's view logits [N, V, 2] of one validator batch (V: the views its policies
    read), computed once and shared by every row that reads them (the same batch list
    object is passed to each row). Keeps the batch's model arrays for stage 2."""

    def __init__(self, bundle: Bundle, *, device: str = "cpu", batch_size: int = BATCH_SIZE,
                 policies: Sequence[PolicyParams | None] = ()) -> None:
        self.model = bundle.model if bundle.model is not None else \
            model_from_checkpoint(bundle.checkpoint)[0]
        self.img_size = bundle.manifest.img_size
        self.n_views = _views_read(bundle, *policies)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._batch: list[Image.Image] | None = None  # held, so its id cannot be reused
        self._arrays = np.empty((0, 3, self.img_size, self.img_size), np.uint8)
        self._logits = np.empty((0, self.n_views, 2), np.float32)

    def arrays(self, images: list[Image.Image]) -> np.ndarray:
        """uint8 [N, 3, S, S]: what both stages read (stage 2 ten-crops these)."""
        if images is not self._batch:
            self._arrays = np.stack([to_model_array(im, self.img_size) for im in images])
            self._logits = predict_view_logits(self.model, self._arrays, n_views=self.n_views,
                                               batch_size=self.batch_size, device=self.device)
            self._batch = images
        return self._arrays

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        self.arrays(images)
        return self._logits


class Stage2Logits:
    """Stage 2's pooled logits [k, 2] for the images of one batch a row asks for, each image
    computed at most once per batch: the cascade asks for its routed images only, the
    stage2_0.5 row for the rest. Stage 2 is deterministic (eval mode), so an image's logits
    do not depend on which row asked first (up to float rounding across batch shapes)."""

    def __init__(self, model: MultiviewModel, stage1: Stage1Views, *,
                 batch_size: int = BATCH_SIZE) -> None:
        self.model, self.stage1, self.batch_size = model, stage1, batch_size
        self._batch: list[Image.Image] | None = None
        self._logits = np.empty((0, 2), np.float32)
        self._done = np.empty(0, bool)
        self.n_computed = 0  # images stage 2 ran on, over the whole simulation

    def __call__(self, images: list[Image.Image], idx: np.ndarray | None = None) -> np.ndarray:
        arrays = self.stage1.arrays(images)
        if images is not self._batch:
            self._batch = images
            self._logits = np.full((len(images), 2), np.nan, np.float32)
            self._done = np.zeros(len(images), bool)
        idx = np.arange(len(images)) if idx is None else np.asarray(idx, np.int64).ravel()
        todo = np.unique(idx[~self._done[idx]])
        if todo.size:
            self._logits[todo] = predict_stage2_logits(
                self.model, arrays[todo], batch_size=self.batch_size, device=self.stage1.device)
            self._done[todo] = True
            self.n_computed += int(todo.size)
        return self._logits[idx]


@dataclass
class ServedModels:
    """What rows read: the bundle, stage 1's shared views, the policy of the stage1_served
    row (a cascade bundle: the ``thresholds`` policy; else the bundle's own) and stage 2
    (cascade bundles with a stage-2 network only)."""

    bundle: Bundle
    stage1: Stage1Views
    stage1_policy: PolicyParams | None = None
    stage2: Stage2Logits | None = None

    @classmethod
    def of(cls, bundle: Bundle, *, stage1_policy: PolicyParams | None = None,
           device: str = "cpu") -> ServedModels:
        cascade = bundle.policy.kind == "cascade"
        row_policy = stage1_policy if cascade else bundle.policy
        if row_policy is not None and row_policy.kind == "cascade":
            raise BadInputError("stage1_policy must be a stage-1 policy (softmax / gate / "
                                "scrc), not a cascade")
        stage1 = Stage1Views(bundle, device=device, policies=(row_policy,))
        net = bundle.stage2_model
        if net is None and cascade and bundle.stage2 is not None:
            net = stage2_model(stage1.model, bundle.stage2)
        stage2 = Stage2Logits(net, stage1) if cascade and net is not None else None
        return cls(bundle=bundle, stage1=stage1, stage1_policy=row_policy, stage2=stage2)

    def no_stage2(self) -> str | None:
        """Why rows that read stage 2 do not apply; None when they do."""
        if self.bundle.policy.kind != "cascade":
            return (f"the bundle serves a {self.bundle.policy.kind!r} policy: a stage-1 "
                    "bundle has no stage 2")
        if self.stage2 is None:
            return ("the cascade bundle carries no stage-2 network (Bundle.stage2 and "
                    "stage2_model unset): load it with load_bundle")
        return None

    def no_stage1_policy(self) -> str | None:
        if self.stage1_policy is None:
            return ("stage 1 alone needs the stage-1 policy (the fitted `thresholds` "
                    "softmax policy of the bundle's checkpoint); none was given")
        return None


@dataclass(frozen=True)
class Row:
    description: str
    build: Callable[[ServedModels], PredictFn]
    unavailable: Callable[[ServedModels], str | None] = lambda m: None  # why not, or None


def _cascade_served(m: ServedModels) -> PredictFn:
    def predict(images: list[Image.Image]) -> np.ndarray:
        # served as the bundle serves it: stage 2 is asked for the routed images only (the
        # callable); Stage2Logits computes each image once per batch and shares it with
        # stage2_0.5 — outputs are deterministic, so sharing changes no answer
        return apply_cascade(m.bundle.policy, m.stage1(images),
                             lambda idx: m.stage2(images, idx))[1]
    return predict


def _stage1_served(m: ServedModels) -> PredictFn:
    return lambda images: apply_policy(m.stage1_policy, m.stage1(images))[1]


def _single_view(m: ServedModels) -> PredictFn:
    return lambda images: policy_probability(m.bundle.policy, m.stage1(images))


def _stage2_alone(m: ServedModels) -> PredictFn:
    return lambda images: cascade_stage2_probability(m.bundle.policy, m.stage2(images))


# name -> row; the report keeps this order
ROWS: dict[str, Row] = {
    "cascade_served": Row(
        "the cascade as served: stage 1 on every image, stage 2 on the routed images only, "
        "the served probability binarised at 0.5", _cascade_served, ServedModels.no_stage2),
    "stage1_served": Row(
        "stage 1 alone as served today: the stage-1 exit policy's remapped probability (a "
        "cascade bundle: the `thresholds` softmax policy on its stage-1 model; else the "
        "bundle's policy; a deferral is emitted as roadwork), binarised at 0.5",
        _stage1_served, ServedModels.no_stage1_policy),
    "single_view_0.5": Row(
        "the calibrated single-view (main view) model probability at 0.5, no exit policy: "
        "what the reference miner does", _single_view),
    "stage2_0.5": Row(
        "stage 2 alone: the calibrated stage-2 (ten-crop pooled) probability at 0.5 on "
        "every image", _stage2_alone, ServedModels.no_stage2),
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
    progress: Progress = no_progress,
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
                            batch_size=BATCH_SIZE, progress=progress)
    seconds = time.perf_counter() - t0
    rows = [ValidatorRow(name=name, description=predict_fns[name][0],
                         per_level=rep.per_level, reward=rep.reward)
            for name, rep in reports.items()]
    return ValidatorSimulation(
        seed=seed, levels=list(LEVELS), flips=flips, n_images=int(keep.size),
        n_positive=int(y.sum()), n_available=int(labels.size), max_images=max_images,
        n_groups=int(np.unique(np.asarray([str(groups[i]) for i in keep])).size),
        seconds=seconds, seconds_per_answer=seconds / (keep.size * len(LEVELS)), rows=rows)


def simulate_bundle(bundle: Bundle | ServedModels, uris, items, labels, groups, *,
                    max_images: int, seed: int = 0, flips: bool = True,
                    rows: Sequence[str] | None = None,
                    progress: Progress = no_progress) -> ValidatorSimulation:
    """Every row of ``ROWS`` (or the named ones) that applies to ``bundle``, on the same
    images; the others are listed in ``skipped`` with the reason. A bare bundle has no
    stage1_served row (it needs the ``thresholds`` softmax policy): pass
    ``ServedModels.of(bundle, stage1_policy=..., device=...)`` for it, or for the device."""
    served = bundle if isinstance(bundle, ServedModels) else ServedModels.of(bundle)
    names = list(ROWS) if rows is None else list(rows)
    skipped = {name: why for name in names if (why := ROWS[name].unavailable(served))}
    fns = {name: (ROWS[name].description, ROWS[name].build(served))
           for name in names if name not in skipped}
    if not fns:
        raise BadInputError(f"no validator row applies to this bundle: {skipped}")
    sim = simulate_rows(uris, items, labels, groups, fns, max_images=max_images, seed=seed,
                        flips=flips, progress=progress)
    return sim.model_copy(update={"skipped": skipped})


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


def _fnr_text(fnr: dict) -> str:
    if not fnr["n"]:
        return "FNR — (no roadwork images)"
    return (f"FNR {fnr['value']:.4f} ({fnr['errors']}/{fnr['n']}, 95% CI "
            f"[{fnr['ci_low']:.4f}, {fnr['ci_high']:.4f}])")


def _served_line(report: dict) -> str:
    head = (f"MCC {report['mcc']:.4f}, accuracy {report['accuracy']:.4f}, balanced accuracy "
            f"{report['balanced_accuracy']:.4f}, {_fnr_text(report['fnr'])}")
    cascade = report.get("cascade")
    if cascade is None:
        auroc = "—" if report["auroc"] is None else f"{report['auroc']:.4f}"
        return (f"val_test, as served at 0.5: {head}, AUROC {auroc}, policy FNR "
                f"{report['policy_fnr']['value'] or 0.0:.4f} with "
                f"{report['policy_defer_rate']:.1%} deferred")
    fpr = report["fpr"]["value"]
    return (f"val_test, the cascade as served at 0.5: {head}, FPR "
            f"{'—' if fpr is None else f'{fpr:.4f}'}; routed to stage 2: "
            f"{cascade['routing_rate']:.1%} ({cascade['n_routed']}/{report['n_images']}); "
            f"latency {1000 * cascade['expected_latency_s']:.1f} ms per image expected = "
            f"stage 1 {1000 * cascade['latency_stage1_s']:.1f} ms + "
            f"{cascade['routing_rate']:.1%} x stage 2 {1000 * cascade['latency_stage2_s']:.1f} ms "
            f"({cascade['latency_source']}; budget {1000 * cascade['latency_budget_s']:.0f} ms)")


def _rows_line(report: dict) -> str | None:
    rows = report.get("comparison") or []
    if not rows:
        return None
    parts = [f"{r['name']} MCC {r['mcc']:.4f}, FNR "
             + ("—" if r["fnr"]["value"] is None else f"{r['fnr']['value']:.4f}")
             + ("" if r["reward"] is None else f", reward {r['reward']:.3f}")
             for r in rows]
    return "val_test at 0.5 (logits, closed-form reward): " + "; ".join(parts)


def _price_line(report: dict) -> str | None:
    price = report.get("price_of_guarantee")
    if price is None:
        return None
    text = (f"price of the guarantee ({price['reference']} minus {price['served']}): "
            f"MCC {price['mcc_gap']:+.4f}")
    if price["reward_gap"] is not None:
        text += f", reward {price['reward_gap']:+.3f} (closed form)"
    if price["validator_reward_gap"] is not None:
        text += f", {price['validator_reward_gap']:+.3f} (validator simulated)"
    return text


def closing_lines(report: dict) -> list[str]:
    """What ``roadwork run`` prints after the graph (without its '[roadwork] ' prefix), from
    the test report's JSON: the bundle as served (a cascade: routing and latency per
    stage), the comparison rows from the logits, the price of the guarantee, and the
    validator reward line with every row it simulated."""
    from roadwork_assets.contracts.schemas import TestReport, validate_artifact

    # a report of another schema_version is refused with 're-materialize test_report'
    parsed = validate_artifact(report, TestReport, "test_report")
    report = parsed.model_dump(mode="json")
    lines = [_served_line(report)]
    if report.get("cascade") is None:
        lines.append("the calibrated model alone at 0.5 (no exit policy): balanced accuracy "
                     f"{report['model_balanced_accuracy']:.4f}")
    lines += [line for line in (_rows_line(report), _price_line(report)) if line]
    if parsed.validator is None:
        lines.append("validator simulator off (exit_policy.validator_images = 0)")
    else:
        lines.append(closing_line(parsed.validator))
    if report.get("cascade") is not None and parsed.skipped_rows:
        lines.append("rows left out: " + "; ".join(
            f"{name} ({why})" for name, why in parsed.skipped_rows.items()))
    return lines
