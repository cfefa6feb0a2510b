"""`roadwork run` skips what is up to date and rebuilds exactly what a change touches.

One real DAGSTER_HOME and ROADWORK_HOME, a tiny class-folder dataset in ROADWORK_DATA,
`roadwork run` in-process (as the run-safety tests call it): a second run skips every
asset; a new file in the data source re-reads the source only; a deleted and an edited
artifact are rebuilt; a trainer setting rebuilds training and what follows, not the
data assets; --force rebuilds everything.
"""

from __future__ import annotations

import json
import re

import pytest

from roadwork_assets_tests.integration.test_run_safety import TINY

# a partition is a split or, for embeddings, "<shard>|<split>"
STAGE = re.compile(r"^\[roadwork\] stage \d+/\d+: (.+?)( \[([\w|]+)\])?$")
REBUILD = re.compile(r"^\[roadwork\]   rebuild (\w+)(?:\[([\w|]+)\])?: (.+)$")


@pytest.fixture
def env(tmp_path, monkeypatch):
    from roadwork_assets.core.data.synthetic.dataset import generate_default_dataset

    generate_default_dataset(tmp_path / "data", n_images=160, image_size=32, seed=3)
    monkeypatch.setenv("ROADWORK_DATA", str(tmp_path / "data" / "images"))
    monkeypatch.setenv("ROADWORK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("ROADWORK_WEIGHTS", raising=False)
    # two embedding shards per split: each is judged, skipped and rebuilt on its own
    monkeypatch.setenv("ROADWORK_EMBEDDING_SHARDS", "2")
    return tmp_path


def _run(capfd, *extra: str, config=TINY) -> tuple[list[tuple[str, str | None]], dict]:
    """(stage runs as (assets, partition), {asset[partition]: rebuild reason})."""
    from roadwork_assets import cli

    capfd.readouterr()
    assert cli.main(["run", "--config-json", json.dumps(config), *extra]) == 0
    out = capfd.readouterr().out.splitlines()
    ran = [(m.group(1), m.group(3)) for m in map(STAGE.match, out)
           if m and not m.group(1).endswith("up to date, skipped")]
    reasons = {m.group(1) + (f"[{m.group(2)}]" if m.group(2) else ""): m.group(3)
               for m in map(REBUILD.match, out) if m}
    return ran, reasons


def _assets(ran) -> set[str]:
    return {name for names, _ in ran for name in names.split(", ")}


def test_second_run_skips_and_changes_rebuild_exactly_what_they_touch(env, capfd):
    import dagster as dg

    from roadwork_assets import definitions
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.defs.runner import stage_partitions, stages

    reg = ArtifactRegistry(env / "home")
    defs = definitions.current_definitions()  # built with the 2 shards the env asks for
    n_runs = sum(len(stage_partitions(defs, s)) for s in stages(defs))
    first, _ = _run(capfd)
    assert len(first) == n_runs  # each stage once per partition (split, or shard of one)
    assert [p for names, p in first if names == "embeddings"] == [
        f"{k}|{s}" for s in ("train", "val_select", "val_calib", "val_test") for k in (0, 1)]

    again, reasons = _run(capfd)
    assert again == [] and reasons == {}
    with dg.DagsterInstance.from_config(str(env / "dagster")) as instance:
        assert len(instance.get_runs()) == n_runs  # the second run started no Dagster run

    # an unreadable file in the data source: source_images re-reads it (quarantined), its
    # images table is unchanged, so nothing downstream runs
    (env / "data" / "images" / "roadwork" / "zz_added.jpg").write_bytes(b"not a jpeg")
    ran, reasons = _run(capfd)
    assert ran == [("source_images", None)]
    assert "data source changed" in reasons["source_images"]

    # a deleted policy and an edited report are rebuilt; training is not
    reg.policy("gate").unlink()
    with open(reg.test_report, "a") as fh:
        fh.write(" ")
    ran, reasons = _run(capfd)
    assert "missing" in reasons["gate_params"]
    assert "edited" in reasons["test_report"]
    assert {"gate_params", "test_report"} <= _assets(ran)
    assert not _assets(ran) & {"source_images", "split_assignment", "split_manifest",
                               "embeddings", "checkpoint", "logits"}
    assert json.loads(reg.policy("gate").read_text())["provenance"]

    # a deleted embedding shard is rebuilt alone: the split's other shard is up to date
    reg.embedding_shard("train", 1).unlink()
    ran, reasons = _run(capfd)
    assert "missing" in reasons["embeddings[1|train]"]
    assert [p for names, p in ran if names == "embeddings"] == ["1|train"]
    assert reg.embedding_shard("train", 1).is_file()

    # a trainer setting: what uses the trainer and what reads its output; the data stays
    config = json.loads(json.dumps(TINY))
    config["resources"]["trainer"]["config"]["epochs"] = 2
    ran, reasons = _run(capfd, config=config)
    assert reasons["checkpoint"] == "settings changed: trainer"
    assert {"checkpoint", "logits", "bundle", "test_report"} <= _assets(ran)
    assert not _assets(ran) & {"source_images", "split_assignment", "split_manifest"}

    forced, _ = _run(capfd, "--force", config=config)
    assert len(forced) == n_runs
