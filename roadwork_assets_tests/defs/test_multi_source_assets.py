"""Several sources through the real Dagster data assets: two layouts (class folders + a
NATIX parquet) ingest together, every row keeps its source down to split_manifest, a
held-out source fills val_test alone with both blocking checks passing, a copy of one
photo in both sources lands in one group, and a missing second source is one error
naming it."""

from __future__ import annotations

import io
import os
import re

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.defs.data.assets import source_images, split_assignment, split_manifest
from roadwork_assets.defs.resources import DatasetSource, ExitPolicyResource
from roadwork_assets_tests.awkward_data import (
    generate_awkward,
    write_class_folders,
    write_natix_parquet,
)
from roadwork_assets_tests.conftest import tiny_resources

STREETS = {"street": 0.5, "night": 0.25, "grayscale": 0.25}  # no look-alike layouts


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """city: 240 class-folder images; natix: 80 NATIX rows plus a resized, re-encoded
    copy of one city photo."""
    root = tmp_path_factory.mktemp("sources")
    city = write_class_folders(generate_awkward(240, seed=21, image_size=64, styles=STREETS),
                               root / "city")
    items = generate_awkward(80, seed=22, image_size=64, styles=STREETS)
    original = sorted((city / "roadwork").glob("*.jpg"))[0]
    copy = Image.open(original).convert("RGB").resize((56, 56), Image.BICUBIC)
    buf = io.BytesIO()
    copy.save(buf, "JPEG", quality=85)
    items[0].image, items[0].label = Image.open(io.BytesIO(buf.getvalue())), 1
    natix = write_natix_parquet(items, root / "natix" / "train-0.parquet").parent
    return city, natix, original


def _resources(tmp_path, spec, **dataset):
    res = tiny_resources(tmp_path / "home")
    res["dataset"] = DatasetSource(spec=spec, max_group_share=0.05, **dataset)
    res["exit_policy"] = ExitPolicyResource(alpha=0.2)
    return res


def _metadata(result, key):
    (mat,) = [e.materialization for e in result.get_asset_materialization_events()
              if e.asset_key == dg.AssetKey(key)]
    return mat.metadata


def test_holdout_source_through_the_data_assets(two_sources, tmp_path):
    city, natix, original = two_sources
    res = _resources(tmp_path, f"{city}{os.pathsep}{natix}", holdout_source="natix",
                     source_balance="equal")
    result = dg.materialize([source_images, split_assignment], resources=res)
    assert result.success
    meta = _metadata(result, "source_images")
    assert meta["n_sources"].value == 2
    assert re.search(r"\| natix +\| [^|]+\| +80 \|", meta["per_source"].value)
    assert re.search(r"\| city +\| [^|]+\| +240 \|", meta["per_source"].value)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["no_cross_split_leakage"].passed and checks["split_shape"].passed
    reg = ArtifactRegistry(tmp_path / "home")
    table = pd.read_parquet(reg.split_assignment)
    natix_rows = table["source"] == "natix"
    assert natix_rows.sum() == 80 and (table.loc[natix_rows, "split"] == "val_test").all()
    # val_test = natix plus the city original of natix's copy, nothing else of city
    city_test = table[~natix_rows & (table["split"] == "val_test")]["item_id"].tolist()
    assert city_test == [f"roadwork/{original.name}"]
    copy_key = table.loc[table["item_id"] == "train-0.parquet#row0", "group_key"].item()
    assert table.loc[table["item_id"] == city_test[0], "group_key"].item() == copy_key
    leak = checks["no_cross_split_leakage"].metadata
    assert leak["groups_spanning_sources"].value == 1
    assert "| natix" in _metadata(result, "split_assignment")["per_source_splits"].value
    # source balance: train draws split equally between... city only (natix is held out)
    train = table[table["split"] == "train"]
    assert train["sample_weight"].to_numpy() == pytest.approx(1.0)
    # every row keeps its source down to the split manifests
    parts = dg.materialize([source_images, split_assignment, split_manifest],
                           selection=["split_manifest"], partition_key="val_test",
                           resources=res)
    assert parts.success
    manifest = pd.read_parquet(reg.split_manifest("val_test"))
    assert set(manifest["source"]) == {"natix", "city"}


def test_equal_balance_weights_each_train_source_half(two_sources, tmp_path):
    city, natix, _ = two_sources
    res = _resources(tmp_path, f"{city}{os.pathsep}natix={natix}", source_balance="equal")
    assert dg.materialize([source_images, split_assignment], resources=res).success
    table = pd.read_parquet(ArtifactRegistry(tmp_path / "home").split_assignment)
    train = table[table["split"] == "train"]
    mass = train.groupby("source")["sample_weight"].sum()
    assert mass["city"] == pytest.approx(mass["natix"]) == pytest.approx(len(train) / 2)
    assert (table.loc[table["split"] != "train", "sample_weight"] == 1.0).all()


def test_missing_second_source_is_named(two_sources, tmp_path):
    city, _, _ = two_sources
    with pytest.raises(BadInputError, match=r"source 'gone' \(entry 2 of 2 in ROADWORK_DATA\) "
                                            r"does not exist"):
        dg.materialize([source_images],
                       resources=_resources(tmp_path, f"{city}{os.pathsep}{tmp_path / 'gone'}"))
    assert not ArtifactRegistry(tmp_path / "home").quarantine_table.exists()


def test_settings_name_the_missing_source_and_refuse_unknown_names(two_sources, tmp_path):
    """`roadwork run` resolves settings before any asset runs: a missing second source,
    a holdout_source or source_weights naming no source are one line each."""
    from roadwork_assets.defs.settings import SettingsError, resolve_settings

    city, natix, _ = two_sources
    env = {"ROADWORK_DATA": f"{city}{os.pathsep}extra={tmp_path / 'nope'}"}
    with pytest.raises(SettingsError, match=r"ROADWORK_DATA \(dataset.spec\) = .* \(source "
                                            r"'extra', entry 2 of 2: .*nope\): no such file"):
        resolve_settings({}, env)
    env = {"ROADWORK_DATA": f"{city}{os.pathsep}{natix}"}
    ok = resolve_settings({"resources": {"dataset": {"config": {"holdout_source": "natix"}}}}, env)
    assert ok.values["dataset"]["holdout_source"] == "natix"
    with pytest.raises(SettingsError, match=r"holdout_source = 'nat' .* \['city', 'natix'\]"):
        resolve_settings({"resources": {"dataset": {"config": {"holdout_source": "nat"}}}}, env)
    bad = {"source_balance": "weights", "source_weights": {"city": 1.0}}
    with pytest.raises(SettingsError, match=r"missing \['natix'\]"):
        resolve_settings({"resources": {"dataset": {"config": bad}}}, env)
