"""test_report's failure explanations: pick the worst val_test failures (false negatives
first), render their heatmaps (``core.evaluation.explain``), write each panel as an
artifact beside the report and inline them all in one markdown entry for the UI."""

from __future__ import annotations

import base64

import dagster as dg
import numpy as np
import pandas as pd

from roadwork_assets.core.artifacts import ArtifactRegistry, atomic_write_bytes
from roadwork_assets.core.evaluation.explain import (
    ExplainConfig,
    explain_failures,
    select_failures,
)
from roadwork_assets.core.evaluation.validator import binarise

PANEL_PREFIX = "failure_"


def _clear_old_panels(reg: ArtifactRegistry) -> None:
    """Panels of an earlier report (which may have had more failures) would be mistaken
    for this one's."""
    folder = reg.test_report_plot("x").parent
    for old in folder.glob(f"{PANEL_PREFIX}*.png"):
        old.unlink(missing_ok=True)


def failure_explanations(context, loaded, manifest: pd.DataFrame, test, arrays,
                         reg: ArtifactRegistry, top_k: int) -> dict[str, dg.MetadataValue]:
    """Metadata ``failure_explanations`` (inline PNGs, false negatives first) and
    ``failure_explanation_files``; each panel is written as
    ``test_report/failure_<rank>.png``. ``top_k`` = 0: off."""
    if top_k == 0:
        return {"failure_explanations": dg.MetadataValue.text(
            "off: exit_policy.explain_failures = 0")}
    item_ids = test["item_ids"].astype(str)
    if not np.array_equal(manifest["item_id"].astype(str).to_numpy(), item_ids):
        why = ("split_manifest[val_test] and logits[val_test] hold other images (or another "
               "order); re-materialize logits[val_test]")
        context.log.warning(f"failure explanations left out: {why}")
        return {"failure_explanations": dg.MetadataValue.text(f"left out: {why}")}
    labels = np.asarray(test["labels"]).astype(np.int64)
    served = binarise(arrays["emitted"])  # what was answered: StreetVision's 0.5 rule
    failures = select_failures(labels, served, arrays["calibrated"], top_k)
    _clear_old_panels(reg)
    n_fn = int(((labels == 1) & (served == 0)).sum())
    n_fp = int(((labels == 0) & (served == 1)).sum())
    header = (f"{len(failures)} of {n_fn} false negatives and {n_fp} false positives "
              f"(false negatives first, most confidently wrong first)")
    if not failures:
        return {"failure_explanations": dg.MetadataValue.md(f"{header}: no failures")}
    explained = explain_failures(loaded.model, manifest["uri"].astype(str).tolist(),
                                 item_ids, failures, loaded.manifest.img_size,
                                 ExplainConfig(top_k=top_k))
    blocks, files = [header], []
    for rank, e in enumerate(explained, start=1):
        if e.png is None:
            blocks.append(f"**{rank}. {e.caption}** — not shown: {e.error}")
            continue
        path = atomic_write_bytes(reg.test_report_plot(f"{PANEL_PREFIX}{rank:02d}"), e.png)
        files.append(str(path))
        data = base64.b64encode(e.png).decode()
        blocks.append(f"**{rank}. {e.caption}** — {e.method} of stage 1\n\n"
                      f"![{e.failure.kind} {e.item_id}](data:image/png;base64,{data})")
    method = next((e.method for e in explained if e.method), "none")
    context.log.info(f"failure explanations: {len(files)} {method} panels of {header}")
    return {"failure_explanations": dg.MetadataValue.md("\n\n".join(blocks)),
            "failure_explanation_method": dg.MetadataValue.text(method),
            "failure_explanation_files": dg.MetadataValue.json(files)}
