"""CI: after the `dagster asset materialize` commands, every asset of the graph has a
materialization on DAGSTER_HOME's instance for every split, and the bundle LATEST names
verifies (hashes, lineage, torch and ONNX on its probe batch). Exit 1 with what is not."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.definitions import defs
from roadwork_assets.defs.resources import default_home
from roadwork_assets.defs.runner import unmaterialized


def main() -> int:
    with dg.DagsterInstance.get() as instance:
        missing = unmaterialized(defs, instance)
        n_runs = len(instance.get_runs())
    if missing:
        print(f"not materialized: {', '.join(missing)}", file=sys.stderr)
        return 1
    bundle = load_bundle(ArtifactRegistry(Path(default_home())).latest_bundle())
    print(f"every asset materialized for every split ({n_runs} runs); bundle "
          f"{bundle.manifest.bundle_id} verifies (onnx checked: {bundle.onnx_checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
