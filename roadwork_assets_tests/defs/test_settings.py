"""Settings precedence: defaults < environment < run config, merged field by field, and
every refusal made before anything runs, in one line naming the setting and the fix."""

from __future__ import annotations

import pytest

from roadwork_assets.defs.settings import SettingsError, resolve_settings


def _rc(group: str, **config) -> dict:
    return {"resources": {group: {"config": config}}}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "dinov2.safetensors"
    path.write_bytes(b"\0")
    return str(path)


def test_run_config_block_keeps_env_fields(tmp_path, weights):
    data = tmp_path / "my.csv"
    data.write_text("path,label\n")
    env = {"ROADWORK_DATA": str(data), "ROADWORK_WEIGHTS": weights}
    run_config = {"resources": {"dataset": {"config": {"default_n_images": 160}},
                                "trainer": {"config": {"epochs": 2, "img_size": 112}}}}
    got = resolve_settings(run_config, env)
    assert got.values["dataset"]["spec"] == str(data)  # not replaced by the block
    assert got.values["dataset"]["default_n_images"] == 160
    trainer = got.values["trainer"]
    assert (trainer["mode"], trainer["weights_path"], trainer["epochs"]) == ("frozen", weights, 2)
    assert trainer["img_size"] == 112  # run config beats the env-derived 224
    assert got.sources["trainer"]["img_size"] == "--config-json"
    assert got.sources["trainer"]["weights_path"] == "ROADWORK_WEIGHTS"
    # Dagster receives every field, so it has nothing left to replace wholesale
    block = got.run_config({"dataset", "trainer"})["resources"]["trainer"]["config"]
    assert block["weights_path"] == weights and block["epochs"] == 2
    assert "exit_policy" not in got.run_config({"dataset", "trainer"})["resources"]
    header = "\n".join(got.header_lines())
    assert f'"spec": "{data}"' in header and "spec from ROADWORK_DATA" in header


def test_defaults_when_nothing_is_set():
    got = resolve_settings({}, {})
    assert got.values["trainer"]["mode"] == "end_to_end" and got.values["dataset"]["spec"] is None
    assert all(not s for s in got.sources.values())


@pytest.mark.parametrize("run_config, env_key, needles", [
    (_rc("trainr", epochs=2), None, ["unknown resource 'trainr'", ("valid: dataset, "
                                     "exit_policy, trainer")]),
    (_rc("trainer", epochz=2), None, ["unknown trainer setting(s) ['epochz']", "epochs"]),
    (_rc("trainer", epochs=-3), None, ["resources.trainer.config.epochs = -3",
                                       "greater than or equal to 1"]),
    (_rc("exit_policy", alpha=2), None, ["resources.exit_policy.config.alpha = 2"]),
    (_rc("trainer", mode="sideways"), None, ["resources.trainer.config.mode = 'sideways'"]),
    (_rc("artifacts", root="/elsewhere"), None, ["'artifacts' is not set by run config",
                                                 "ROADWORK_HOME"]),
    ({"ops": {}}, None, ["unknown top-level key(s) ['ops']"]),
    ([1, 2], None, ["must be a JSON object"]),
    (_rc("trainer", mode="end_to_end"), "weights", ["ROADWORK_WEIGHTS is set", ("trainer.mode="
                                                     "end_to_end"), "unset ROADWORK_WEIGHTS"]),
    (_rc("trainer", weights_path="w.safetensors"), None, [("trainer.mode=end_to_end never "
                                                          "reads weights")]),
    ({}, "missing_data", ["ROADWORK_DATA (dataset.spec) = /nonexistent/my.csv: no such file"]),
    ({}, "missing_weights", [("ROADWORK_WEIGHTS (trainer.weights_path) = /nonexistent/w.pt: "
                             "no such file")]),
])
def test_refused_with_one_line_naming_the_setting(run_config, env_key, needles, weights):
    env = {"weights": {"ROADWORK_WEIGHTS": weights},
           "missing_data": {"ROADWORK_DATA": "/nonexistent/my.csv"},
           "missing_weights": {"ROADWORK_WEIGHTS": "/nonexistent/w.pt"}}.get(env_key, {})
    with pytest.raises(SettingsError) as err:
        resolve_settings(run_config, env)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
