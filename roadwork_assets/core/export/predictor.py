"""Serve a verified bundle: images -> probability remapped to 0.5, decision, stage.

One-stage bundles: stage 1 on every image, a three-way decision (positive / negative /
defer), stage always 1. Cascade bundles: stage 1 on every image, stage 2 on the images
stage 1 routes ONLY (``apply_cascade``'s callable form), a two-way decision, stage 1 or 2.
The served probability binarises at 0.5 (np.round: 0.5 -> 0) to the decision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.export.bundle import Bundle, load_bundle
from roadwork_assets.core.export.cascade_serving import is_cascade, served_outputs
from roadwork_assets.core.export.engines import TorchEngine, choose_engine
from roadwork_assets.core.training.pipeline import model_from_checkpoint

DECISION_NAMES = {1: "positive", 0: "negative", -1: "defer"}


@dataclass
class Prediction:
    path: str
    probability: float
    decision: str
    stage: int = 1  # which stage served it (2: a cascade routed it to stage 2)

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "probability": self.probability, "decision": self.decision,
                "stage": self.stage}


@dataclass
class FailedImage:
    """An image ``predict_each`` could not read; the others in its batch were predicted."""

    path: str
    error: str

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "error": self.error}


class BundlePredictor:
    """Loads a bundle once (every load-time check of ``load_bundle``) and predicts
    batches of images. ``engine``: torch | onnx | auto (``engines.choose_engine``: ONNX
    Runtime where the bundle's checked ONNX files can serve and it times faster);
    ``engine_reason`` says what was chosen and why."""

    def __init__(self, bundle: Bundle, device: str = "cpu", batch_size: int = 32,
                 engine: str = "torch") -> None:
        self.bundle = bundle
        if bundle.model is not None:  # load_bundle already rebuilt (and probed) it
            self.model = bundle.model
        else:
            self.model, _ = model_from_checkpoint(bundle.checkpoint)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.stage2_rows = 0  # images stage 2 has run on (routed ones only)
        self.stage2_model = bundle.stage2_model
        if self.stage2_model is None and bundle.stage2 is not None:
            from roadwork_assets.core.training.multiview import stage2_model

            self.stage2_model = stage2_model(self.model, bundle.stage2)
        choice = choose_engine(engine, bundle, TorchEngine(self.model, self.stage2_model,
                                                           self.device), self.device)
        self.engine, self.engine_reason = choice.engine, choice.reason

    @classmethod
    def from_dir(cls, directory: Path, *, check_onnx: bool = True, **kwargs) -> BundlePredictor:
        """``check_onnx=False``: skip the ONNX-vs-torch probe comparison; the ONNX engine
        then never serves (``auto`` falls back to torch, ``onnx`` is refused)."""
        return cls(load_bundle(Path(directory), check_onnx=check_onnx), **kwargs)

    def predict_arrays(self, images_uint8: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [N, 3, S, S] -> (remapped probability [N], decision int8 [N], stage int8
        [N]); a cascade runs stage 2 on the routed images only (``stage2_rows`` counts them)."""
        view_logits = self.engine.view_logits(images_uint8, self.bundle.manifest.n_views,
                                              self.batch_size)
        stage2 = None
        if is_cascade(self.bundle.policy):
            def stage2(idx: np.ndarray) -> np.ndarray:
                return self.stage2_logits(images_uint8[idx])
        decision, prob, stage = served_outputs(self.bundle.policy, view_logits, stage2)
        return prob, decision, stage

    def stage2_logits(self, images_uint8: np.ndarray) -> np.ndarray:
        """Stage 2's pooled logits [k, 2] of the given images (a cascade bundle only)."""
        if self.stage2_model is None:
            raise ValueError("this bundle has no stage 2 (its policy is not a cascade)")
        self.stage2_rows += len(images_uint8)
        return self.engine.stage2_logits(images_uint8, self.batch_size)

    def predict_paths(self, paths: list[str | Path]) -> list[Prediction]:
        """Any size, JPEG / PNG (RGBA, palette, 16-bit, ...) / WebP: ``decode_image``
        makes RGB, ``to_model_array`` centre-crops and resizes to the bundle's img_size."""
        size = self.bundle.manifest.img_size
        arrays = np.stack([to_model_array(decode_image(Path(p), str(p)), size) for p in paths])
        return self._predictions(paths, arrays)

    def predict_each(self, paths: list[str | Path]) -> list[Prediction | FailedImage]:
        """``predict_paths`` that survives bad files: each image is decoded on its own, one
        that cannot be read (missing, empty, corrupt, not an image, too large) becomes a
        ``FailedImage`` naming why, and the good ones are predicted in one batch. The
        result keeps the order of ``paths``."""
        size = self.bundle.manifest.img_size
        out: list[Prediction | FailedImage | None] = [None] * len(paths)
        good, arrays = [], []
        for i, p in enumerate(paths):
            try:
                arrays.append(to_model_array(decode_image(Path(p), str(p)), size))
                good.append(i)
            except BadInputError as exc:
                out[i] = FailedImage(str(p), str(exc))
        if good:
            preds = self._predictions([paths[i] for i in good], np.stack(arrays))
            for i, pred in zip(good, preds, strict=True):
                out[i] = pred
        return out  # type: ignore[return-value]  # every slot is filled above

    def _predictions(self, paths: list[str | Path], arrays: np.ndarray) -> list[Prediction]:
        prob, decision, stage = self.predict_arrays(arrays)
        return [Prediction(str(p), float(pr), DECISION_NAMES[int(d)], int(st))
                for p, pr, d, st in zip(paths, prob, decision, stage, strict=True)]
