"""ONNX export at a fixed spatial size, with an onnxruntime parity measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from roadwork_assets.core.artifacts import atomic_path
from roadwork_assets.core.models.classifier import RoadworkClassifier


def export_onnx(model: RoadworkClassifier, img_size: int, dest: Path) -> Path:
    """Write ``model`` as ONNX: input ``images`` float [B, 3, S, S] in [0, 1] -> ``logits``.

    The spatial size is fixed (StreetVision serves 224x224; ViT position embeddings are
    fixed too); the batch dimension is dynamic. PEFT adapters must be merged first.
    """
    model = model.eval().cpu()
    example = torch.rand(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(dest) as tmp:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp), external_data=False)
    return dest


def onnx_parity(model: RoadworkClassifier, onnx_path: Path, img_size: int,
                n: int = 4, seed: int = 0) -> float:
    """Max |logit difference| between torch and onnxruntime on random images."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).random((n, 3, img_size, img_size), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x})[0]
    with torch.no_grad():
        ref = model.eval().cpu()(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max())
