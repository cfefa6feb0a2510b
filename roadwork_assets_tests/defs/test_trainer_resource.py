"""TrainerResource is TrainerConfig seen by Dagster: the same fields, defaults, bounds and
validators (one definition, in core), all of them settable from the launchpad."""

from __future__ import annotations

import dagster as dg
import pytest
from pydantic import ValidationError

from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.defs.resources import TrainerResource
from roadwork_assets.defs.settings import SettingsError, resolve_settings


def _launchpad_fields() -> dict[str, dg.Field]:
    """The config schema Dagster builds for the resource (what the launchpad offers)."""
    return TrainerResource.to_config_schema().as_field().config_type.fields


@pytest.mark.parametrize("name", list(TrainerConfig.model_fields))
def test_every_config_field_is_a_resource_field_with_the_same_definition(name):
    want = TrainerConfig.model_fields[name]
    got = TrainerResource.model_fields[name]
    assert got.annotation == want.annotation
    assert got.get_default(call_default_factory=True) == want.get_default(
        call_default_factory=True)
    assert got.description == want.description
    assert got.metadata == want.metadata  # ge / le / gt / lt bounds
    field = _launchpad_fields()[name]
    assert not field.is_required
    assert field.default_provided, f"the launchpad shows no default for {name}"
    assert field.default_value == want.get_default(call_default_factory=True)
    assert field.description == want.description


def test_resource_has_no_field_of_its_own():
    assert list(TrainerResource.model_fields) == list(TrainerConfig.model_fields)
    assert set(_launchpad_fields()) == set(TrainerConfig.model_fields)


def test_defaults_and_settings_round_trip_through_to_config():
    assert TrainerResource().to_config() == TrainerConfig()
    given = {"epochs": 3, "weight_decay": 0.0, "patience": 2, "head_dropout": 0.3,
             "probe_cs": [0.5], "mode": "frozen", "weights_path": "w.safetensors",
             "device": "cpu", "attn_impl": "eager"}
    assert TrainerResource(**given).to_config() == TrainerConfig(**given)
    assert type(TrainerResource().to_config()) is TrainerConfig


def _errors(cls, values):
    with pytest.raises(ValidationError) as err:
        cls(**values)
    return [(e["loc"], e["type"], e["msg"]) for e in err.value.errors()]


@pytest.mark.parametrize("values", [
    {"epochs": -3}, {"img_size": 8}, {"img_size": 2048}, {"batch_size": 0}, {"lr": 0},
    {"weight_decay": -0.1}, {"patience": 0}, {"head_dropout": 1.0}, {"n_views": 5},
    {"threads": 0}, {"mode": "sideways"}, {"device": "tpu"}, {"attn_impl": "flash"},
    {"probe_cs": ["strong"]}, {"epochs": "many"},
    {"mode": "frozen"},  # the model validator: frozen needs weights_path
    {"epochz": 2},  # unknown field
])
def test_invalid_values_are_refused_the_same_way(values):
    assert _errors(TrainerResource, values) == _errors(TrainerConfig, values)


def test_launchpad_run_config_reaches_the_config_and_is_validated():
    seen = {}

    @dg.asset
    def probe(trainer: TrainerResource) -> None:
        seen["cfg"] = trainer.to_config()

    hidden = {"weight_decay": 0.0, "patience": 2, "head_dropout": 0.25, "probe_cs": [0.5, 5.0]}
    result = dg.materialize([probe], resources={"trainer": TrainerResource()},
                            run_config={"resources": {"trainer": {"config": hidden}}})
    assert result.success
    assert seen["cfg"] == TrainerConfig(**hidden)
    with pytest.raises(dg.DagsterResourceFunctionError) as err:
        dg.materialize([probe], resources={"trainer": TrainerResource()},
                       run_config={"resources": {"trainer": {"config": {"epochs": -3}}}})
    assert "greater than or equal to 1" in str(err.value.__cause__)


def test_settings_merge_validates_every_config_field():
    got = resolve_settings({"resources": {"trainer": {"config": {"patience": 2,
                                                                  "probe_cs": [1, 10]}}}}, {})
    assert got.values["trainer"]["patience"] == 2
    assert got.values["trainer"]["probe_cs"] == [1.0, 10.0]
    assert set(got.values["trainer"]) == set(TrainerConfig.model_fields)
    with pytest.raises(SettingsError, match=r"resources\.trainer\.config\.patience = 0: .*"
                       "greater than or equal to 1"):
        resolve_settings({"resources": {"trainer": {"config": {"patience": 0}}}}, {})
