"""Materialize the whole graph, stage by stage, through Dagster.

Split-partitioned and unpartitioned assets cannot share one run (a run targets one
partition), so the graph is run as five stages; every stage is a real Dagster run on
the given instance, visible in the UI with its logs, metadata and check results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg

from roadwork_assets.contracts.splits import SPLITS


@dataclass(frozen=True)
class Stage:
    assets: tuple[str, ...]
    partitioned: bool


STAGES: tuple[Stage, ...] = (
    Stage(("source_images", "split_assignment"), partitioned=False),
    Stage(("split_manifest", "embeddings"), partitioned=True),
    Stage(("checkpoint",), partitioned=False),
    Stage(("logits",), partitioned=True),
    Stage(("thresholds", "gate_params", "conformal_sets", "bundle", "test_report"),
          partitioned=False),
)


def materialize_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *,
    run_config: dict | None = None,
    say: Callable[[str], None] = print,
    splits: Sequence[str] = SPLITS,
) -> list[dg.ExecuteInProcessResult]:
    """Run every stage; raise on the first failed run (a failed blocking check included)."""
    job = defs.resolve_implicit_global_asset_job_def()
    results = []
    for n, stage in enumerate(STAGES, start=1):
        keys = [dg.AssetKey(name) for name in stage.assets]
        for partition in (splits if stage.partitioned else [None]):
            label = ", ".join(stage.assets) + (f" [{partition}]" if partition else "")
            say(f"[roadwork] stage {n}/{len(STAGES)}: {label}")
            t0 = time.perf_counter()
            result = job.execute_in_process(
                instance=instance, asset_selection=keys, partition_key=partition,
                run_config=run_config, raise_on_error=True,
                tags={"roadwork/stage": str(n)},
            )
            say(f"[roadwork]   done in {time.perf_counter() - t0:.1f}s (run {result.run_id})")
            results.append(result)
    return results
