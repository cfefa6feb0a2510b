"""Serve a verified bundle: images -> probability remapped to 0.5 + three-way decision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roadwork_assets.core.calibration.policies import apply_policy
from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.data.transforms import to_model_array
from roadwork_assets.core.export.bundle import Bundle, load_bundle
from roadwork_assets.core.training.pipeline import model_from_checkpoint
from roadwork_assets.core.training.trainer import predict_view_logits

DECISION_NAMES = {1: "positive", 0: "negative", -1: "defer"}


@dataclass
class Prediction:
    path: str
    probability: float
    decision: str

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "probability": self.probability, "decision": self.decision}


class BundlePredictor:
    """Loads a bundle once (every load-time check of ``load_bundle``) and predicts
    batches of images."""

    def __init__(self, bundle: Bundle, device: str = "cpu", batch_size: int = 32) -> None:
        self.bundle = bundle
        if bundle.model is not None:  # load_bundle already rebuilt (and probed) it
            self.model = bundle.model
        else:
            self.model, _ = model_from_checkpoint(bundle.checkpoint)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, directory: Path, *, check_onnx: bool = True, **kwargs) -> BundlePredictor:
        """``check_onnx=False``: skip the ONNX-vs-torch probe comparison (predict serves
        torch, so ONNX only matters to whoever deploys model.onnx)."""
        return cls(load_bundle(Path(directory), check_onnx=check_onnx), **kwargs)

    def predict_arrays(self, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 3, S, S] -> (remapped probability [N], decision int8 [N])."""
        view_logits = predict_view_logits(
            self.model, images_uint8, n_views=self.bundle.manifest.n_views,
            batch_size=self.batch_size, device=self.device,
        )
        decision, prob = apply_policy(self.bundle.policy, view_logits)
        return prob, decision

    def predict_paths(self, paths: list[str | Path]) -> list[Prediction]:
        size = self.bundle.manifest.img_size
        arrays = np.stack([to_model_array(decode_image(Path(p), str(p)), size) for p in paths])
        prob, decision = self.predict_arrays(arrays)
        return [Prediction(str(p), float(pr), DECISION_NAMES[int(d)])
                for p, pr, d in zip(paths, prob, decision, strict=True)]
