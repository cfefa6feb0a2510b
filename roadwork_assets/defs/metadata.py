"""Small converters from core results to Dagster metadata (no ML here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from roadwork_assets.core.artifacts import file_sha256


def path_meta(path: Path) -> dict[str, dg.MetadataValue]:
    return {
        "path": dg.MetadataValue.path(str(path)),
        "sha256": dg.MetadataValue.text(file_sha256(path)),
        "size_bytes": dg.MetadataValue.int(path.stat().st_size),
    }


def table_md(frame: pd.DataFrame, limit: int = 20) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    return dg.MetadataValue.md(frame.head(limit).to_markdown(index=False))


def counts_meta(counts: dict[str, Any]) -> dg.MetadataValue:
    return dg.MetadataValue.json(counts)




def floats(metrics: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    """Numeric entries as float metadata (plottable across materializations)."""
    return {
        k: dg.MetadataValue.float(float(v))
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    }


def png_markdown(path: Path, title: str) -> dg.MetadataValue:
    """A PNG inlined as markdown, so the Dagster UI shows the image itself."""
    import base64

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})")
