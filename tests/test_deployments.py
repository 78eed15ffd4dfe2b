"""prefect.yaml and the per-environment parameter files agree with the flow's parameter model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.params import PipelineParams

ROOT = Path(__file__).resolve().parent.parent


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_every_deployment_entrypoint_is_a_flow() -> None:
    from prefect.flows import load_flow_from_entrypoint

    for deployment in _prefect_yaml()["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + name)
        assert flow.name == "conveyor-training"


@pytest.mark.parametrize("deployment", _prefect_yaml()["deployments"], ids=lambda d: d["name"])
def test_deployment_parameters_validate(deployment: dict) -> None:
    PipelineParams(**deployment.get("parameters", {}).get("params", {}))


@pytest.mark.parametrize("env_file", sorted((ROOT / "deployments").glob("*.yaml")), ids=lambda p: p.name)
def test_environment_parameter_files_validate(env_file: Path) -> None:
    PipelineParams(**yaml.safe_load(env_file.read_text())["params"])


def test_the_run_form_is_generated_from_the_params_model() -> None:
    from flows.training import training

    schema = training.parameters.model_dump()
    assert "params" in schema["properties"]
    definitions = schema.get("definitions", {})
    fields = definitions["PipelineParams"]["properties"]
    assert {"storage_url", "cluster", "max_rows", "training", "gate_metric"} <= set(fields)
