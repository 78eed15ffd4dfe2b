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


def test_triggers_and_schedules_name_their_timezone_and_event() -> None:
    deployments = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    assert all(s["timezone"] == "UTC" for d in deployments.values() for s in d.get("schedules", []))
    trigger = deployments["on-new-data"]["triggers"][0]
    assert trigger["expect"] == ["conveyor.dataset.landed"]
    assert trigger["parameters"]["params"]["source_url"] == "{{ event.resource.id }}"


ENV_FILES = sorted(
    p for p in (ROOT / "deployments").glob("*.yaml") if "params" in (yaml.safe_load(p.read_text()) or {})
)


def test_dev_and_prod_parameter_files_exist() -> None:
    assert {p.name for p in ENV_FILES} >= {"dev.yaml", "prod.yaml"}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_environment_parameter_files_validate(env_file: Path) -> None:
    PipelineParams(**yaml.safe_load(env_file.read_text())["params"])


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
