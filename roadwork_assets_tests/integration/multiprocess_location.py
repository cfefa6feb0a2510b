"""A loadable code location for the multiprocess-executor test.

The multiprocess executor runs every step in a fresh process that rebuilds the job from
this module (``dg.reconstructable(tiny_job)``), so the job's resources cannot be passed
in from the test: they come from the environment the test sets and the children inherit
(ROADWORK_HOME: the artifact root; the sizes below: a tiny, fast config). With the
forkserver start method the children inherit the environment of the fork server, which
starts at the first multiprocess run of the test session: one artifact root per session.
"""

from __future__ import annotations

import functools
import os

import dagster as dg

from roadwork_assets.definitions import build_definitions
from roadwork_assets_tests.conftest import tiny_resources

JOB_NAME, SHARD_JOB_NAME = "tiny_multiprocess", "tiny_multiprocess_shards"
N_IMAGES = 320  # 160 scenes: val_calib keeps enough roadwork scenes for CRC at alpha 0.2
# forkserver with this module preloaded: each step process forks from a server that has
# already imported dagster, torch and the definitions (spawn re-imports them per step,
# seconds each); the step still runs in its own process, which is what the test is about
MULTIPROCESS = {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": [
    __name__]}}}


@functools.cache
def tiny_definitions() -> dg.Definitions:
    resources = tiny_resources(os.environ["ROADWORK_HOME"], n_images=N_IMAGES, alpha=0.2,
                               epochs=1)
    built = build_definitions(resources)  # the real graph, audited as in production
    # named jobs: the implicit __ASSET_JOB cannot be reconstructed on its own; one asset
    # job holds one partitions definition, so the split x shard embeddings get their own
    executor = dg.multiprocess_executor.configured(MULTIPROCESS)
    sharded = dg.AssetSelection.assets("embeddings")
    jobs = [dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.all() - sharded,
                                executor_def=executor),
            dg.define_asset_job(SHARD_JOB_NAME, selection=sharded, executor_def=executor)]
    return dg.Definitions.merge(built, dg.Definitions(jobs=jobs))


def tiny_job() -> dg.JobDefinition:
    return tiny_definitions().resolve_job_def(JOB_NAME)


def tiny_shard_job() -> dg.JobDefinition:
    return tiny_definitions().resolve_job_def(SHARD_JOB_NAME)
