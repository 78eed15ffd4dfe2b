"""infra/: the compose file and images are well-formed, pinned, and take secrets from the environment only."""

from __future__ import annotations

import re

import yaml

from tests.support import REPO_ROOT

INFRA = REPO_ROOT / "infra"
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|STORAGE_OPTIONS|KEY", re.IGNORECASE)


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_has_the_production_shape() -> None:
    services = _compose()["services"]
    assert {
        "postgres",
        "prefect-server",
        "prefect-worker",
        "dask-scheduler",
        "dask-gpu-worker",
        "minio",
    } <= set(services)
    gpu = services["dask-gpu-worker"]
    assert gpu["command"][:3] == ["dask", "cuda", "worker"] and "--rmm-pool-size" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert (
        "postgresql+asyncpg"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )


def test_secrets_come_from_the_environment_only() -> None:
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAMES.search(key):
                assert isinstance(value, str) and value.startswith("${"), (
                    f"{name}.{key} must come from the environment"
                )
    assert "${PREFECT_AUTH_STRING:?" in (INFRA / "compose.yaml").read_text()


def test_images_are_pinned_and_run_as_a_user() -> None:
    for service in _compose()["services"].values():
        image = service.get("image", "")
        if not image.startswith("conveyor/"):
            assert ":" in image and not image.endswith(":latest"), image
    for dockerfile in (INFRA / "docker").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        base = re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1)
        assert ":" in base and not base.endswith(":latest"), base
        assert "uv sync --frozen" in text and "COPY pyproject.toml uv.lock" in text
        assert re.search(r"^USER (?!root)", text, re.MULTILINE)


def test_dask_gpu_worker_config_parses() -> None:
    config = yaml.safe_load((INFRA / "dask" / "gpu-worker.yaml").read_text())
    memory = config["distributed"]["worker"]["memory"]
    assert memory["target"] < memory["spill"] < memory["pause"] < memory["terminate"] <= 1
