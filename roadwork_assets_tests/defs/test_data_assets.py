"""Data assets on user data: quarantine shows in metadata; a refused split leaves the
previous artifacts untouched."""

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256
from roadwork_assets.defs.data.assets import source_images, split_assignment
from roadwork_assets.defs.resources import DatasetSource, ExitPolicyResource
from roadwork_assets_tests.conftest import tiny_resources


def _class_folders(root, n_per_class=60):
    rng = np.random.default_rng(0)
    for name in ("roadwork", "none"):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    (root / "roadwork" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _resources(tmp_path, data, **policy):
    res = tiny_resources(tmp_path / "home")
    res["dataset"] = DatasetSource(spec=str(data))
    res["exit_policy"] = ExitPolicyResource(**({"alpha": 0.2} | policy))
    return res


def test_corrupt_image_is_quarantined_and_listed_in_metadata(tmp_path):
    data = _class_folders(tmp_path / "data")
    result = dg.materialize([source_images, split_assignment],
                            resources=_resources(tmp_path, data))
    assert result.success
    (mat,) = [e.materialization for e in result.get_asset_materialization_events()
              if e.asset_key == dg.AssetKey("source_images")]
    assert mat.metadata["n_quarantined"].value == 1
    assert "broken.jpg" in mat.metadata["quarantined"].value
    assert mat.metadata["n_images"].value == 120
    quarantine = pd.read_parquet(ArtifactRegistry(tmp_path / "home").quarantine_table)
    assert quarantine["item_id"].str.contains("broken.jpg").all()


def test_too_few_calib_positives_fails_clearly_and_keeps_previous_artifact(tmp_path):
    data = _class_folders(tmp_path / "data")
    assert dg.materialize([source_images, split_assignment],
                          resources=_resources(tmp_path, data)).success
    path = ArtifactRegistry(tmp_path / "home").split_assignment
    before = file_sha256(path)
    with pytest.raises(InsufficientDataError, match=r"val_calib has \d+ positive images in \d+ groups; "
                       r"its threshold part .* has \d+ groups with roadwork; .* needs at least 99"):
        dg.materialize([source_images, split_assignment], selection=["split_assignment"],
                       resources=_resources(tmp_path, data, alpha=0.01))
    assert file_sha256(path) == before


def test_damaged_previous_assignment_is_one_error_naming_it_and_the_fix(tmp_path):
    data = _class_folders(tmp_path / "data")
    assert dg.materialize([source_images, split_assignment],
                          resources=_resources(tmp_path, data)).success
    path = ArtifactRegistry(tmp_path / "home").split_assignment
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    from roadwork_assets.contracts.errors import BadInputError

    with pytest.raises(BadInputError, match=r"previous split assignment .* cannot be read .* "
                       r"delete it to re-split from scratch"):
        dg.materialize([source_images, split_assignment], selection=["split_assignment"],
                       resources=_resources(tmp_path, data))
