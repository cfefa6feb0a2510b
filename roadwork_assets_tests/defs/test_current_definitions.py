"""`roadwork run` in a long-lived process writes under the ROADWORK_HOME it announces,
not the one `definitions.defs` was built for at import time."""

from __future__ import annotations

from roadwork_assets import definitions


def test_current_definitions_follow_the_environment_home(tmp_path, monkeypatch):
    built_for = definitions.defs.resources["artifacts"].root
    monkeypatch.setenv("ROADWORK_HOME", built_for)
    assert definitions.current_definitions() is definitions.defs
    monkeypatch.setenv("ROADWORK_HOME", str(tmp_path / "other"))
    fresh = definitions.current_definitions()
    assert fresh is not definitions.defs
    assert fresh.resources["artifacts"].root == str(tmp_path / "other")
    assert fresh.resources["mlflow"].tracking_uri.endswith(
        str(tmp_path / "other" / "mlflow" / "mlflow.db"))
