"""prefect.yaml and the per-environment parameter files agree with the flow's parameter model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conveyor.flows.params import PipelineParams
from tests.support import REPO_ROOT

ROOT = REPO_ROOT


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _flow(deployment: dict):
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = deployment["entrypoint"].partition(":")
    return load_flow_from_entrypoint(str(ROOT / path) + ":" + name)


@pytest.mark.parametrize("deployment", _prefect_yaml()["deployments"], ids=lambda d: d["name"])
def test_deployment_entrypoint_and_parameters_validate(deployment: dict) -> None:
    flow = _flow(deployment)
    assert flow.name.startswith("conveyor-")
    if deployment.get("parameters"):
        flow.validate_parameters(deployment["parameters"])
    if flow.name == "conveyor-training":
        PipelineParams(**deployment.get("parameters", {}).get("params", {}))
    for trigger in deployment.get("triggers", []):  # what an event would start must validate too
        filled = yaml.safe_load(
            yaml.safe_dump(trigger["parameters"]).replace("{{ event.resource.id }}", "data/x")
        )
        flow.validate_parameters(filled)


def test_triggers_and_schedules_name_their_timezone_and_event() -> None:
    deployments = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    assert all(s["timezone"] == "UTC" for d in deployments.values() for s in d.get("schedules", []))
    trigger = deployments["on-new-data"]["triggers"][0]
    assert trigger["expect"] == ["conveyor.dataset.landed"]
    assert trigger["parameters"]["params"]["source_url"] == "{{ event.resource.id }}"
    assert trigger["parameters"]["params"]["spec"] == "flights"  # the trigger names the spec it runs
    scoring = deployments["score-new-data"]["triggers"][0]
    assert scoring["expect"] == ["conveyor.scoring.landed"]
    assert scoring["parameters"]["params"]["source_url"] == "{{ event.resource.id }}"
    for trig in (trigger, scoring):  # only events about the landing folders start a run
        assert trig["match"]["prefect.resource.id"].endswith("*")
    assert deployments["watch-scoring"]["parameters"]["event"] == "conveyor.scoring.landed"


ENV_FILES = sorted(
    p for p in (ROOT / "deployments").glob("*.yaml") if "params" in (yaml.safe_load(p.read_text()) or {})
)


def test_dev_and_prod_parameter_files_exist() -> None:
    assert {p.name for p in ENV_FILES} >= {"dev.yaml", "prod.yaml"}


OPERATOR = {  # what each environment's operator allows (comments in the files say the same)
    "prod.yaml": {
        "CONVEYOR_ALLOWED_STORAGE_PREFIXES": "s3://conveyor-prod",
        "CONVEYOR_ALLOWED_SCHEDULERS": "tcp://dask-scheduler:8786",
    },
}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_environment_parameter_files_validate(env_file: Path, monkeypatch) -> None:
    for name, value in OPERATOR.get(env_file.name, {}).items():
        monkeypatch.setenv(name, value)
    PipelineParams(**yaml.safe_load(env_file.read_text())["params"])


def test_prod_parameters_are_refused_without_the_operator_settings(monkeypatch) -> None:
    monkeypatch.delenv("CONVEYOR_ALLOWED_SCHEDULERS", raising=False)
    with pytest.raises(ValueError, match="not under an allowed prefix|not a configured scheduler"):
        PipelineParams(**yaml.safe_load((ROOT / "deployments" / "prod.yaml").read_text())["params"])


def test_the_run_form_is_generated_from_the_params_model() -> None:
    from conveyor.flows.training import training

    schema = training.parameters.model_dump()
    assert "params" in schema["properties"]
    definitions = schema.get("definitions", {})
    fields = definitions["PipelineParams"]["properties"]
    assert {"storage_url", "cluster", "max_rows", "training", "gate_metric", "search"} <= set(fields)
    family = definitions["TrainingOptions"]["properties"]["model"]
    assert family["enum"] == ["gbtree", "random_forest", "linear"] and family["default"] == "gbtree"
    search = definitions["SearchOptions"]["properties"]
    assert search["budget"]["minimum"] == 1 and search["families"]["items"]["enum"] == family["enum"]
