"""Promote an artifact only after its blocking checks pass.

Assets write to a staged path next to the artifact, run their checks on what was
written, then either rename it into place or set it aside as ``*.rejected``. A failed
blocking check therefore stops downstream assets in this run *and* leaves the last
good artifact in place for every later run, `roadwork predict` included.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from roadwork_assets.core.artifacts import promote, reject


def publish(
    context: dg.AssetExecutionContext,
    staged: Path | list[tuple[Path, Path]],
    dest: Path | None,
    checks: list[dg.AssetCheckResult],
) -> tuple[Path, dict[str, dg.MetadataValue]]:
    """Promote ``staged`` to ``dest`` (or each (staged, dest) pair) if all checks passed.

    Returns the path the asset should report and metadata saying what happened.
    """
    pairs = staged if isinstance(staged, list) else [(staged, dest)]
    failed = [c.check_name for c in checks if not c.passed]
    if not failed:
        for src, dst in pairs:
            promote(src, dst)
        return pairs[0][1], {"promoted": dg.MetadataValue.bool(True)}
    rejected = [reject(src, dst) for src, dst in pairs]
    context.log.error(
        f"blocking check(s) {failed} failed: kept the previous artifact at {pairs[0][1]}, "
        f"wrote the rejected one to {rejected[0]}"
    )
    return rejected[0], {"promoted": dg.MetadataValue.bool(False),
                         "rejected_path": dg.MetadataValue.path(str(rejected[0]))}
