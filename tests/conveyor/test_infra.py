"""infra/: the compose file and images are well-formed, pinned, and take secrets from the environment only."""

from __future__ import annotations

import json
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


# --- issue 16, items 1 and 10: exposure, the MinIO app user, placeholders, how uv is installed ------------

LOOPBACK = "127.0.0.1"


def _published(service: dict) -> list[tuple[str | None, str]]:
    """(host address or None for every interface, container port) of each published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip"), str(port["target"])))
            continue
        parts = str(port).split(":")
        out.append((parts[0] if len(parts) == 3 else None, parts[-1].split("/")[0]))
    return out


def _env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_nothing_is_published_on_a_public_interface() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for host, target in _published(service):
            assert host == LOOPBACK, f"{name} publishes {target} on {host or 'every interface'}"
    scheduler = services["dask-scheduler"]
    assert "8786" not in [target for _, target in _published(scheduler)]  # the compose network only
    assert "tcp://dask-scheduler:8786" in services["dask-gpu-worker"]["command"]


def test_the_app_reaches_the_store_as_a_bucket_scoped_user() -> None:
    compose = _compose()
    services = compose["services"]
    root_users = {
        name for name, s in services.items() if "MINIO_ROOT_PASSWORD" in (s.get("environment") or {})
    }
    assert root_users == {"minio", "minio-setup", "preflight"}
    assert not any(k.startswith("MINIO_ROOT") for k in compose["x-conveyor-env"])
    setup = services["minio-setup"]
    assert re.match(r"^minio/mc:RELEASE\.\d{4}-", setup["image"])
    script = setup["command"][0]
    assert '"Resource": ["arn:aws:s3:::BUCKET/*"]' in script and "s/BUCKET/$$CONVEYOR_BUCKET/g" in script
    assert 'mc admin policy attach local conveyor-app --user "$$MINIO_APP_USER"' in script
    assert "s3:*" not in script and "arn:aws:s3:::*" not in script
    for app in ("prefect-worker", "dask-gpu-worker"):
        assert services[app]["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"
    env = _env_example()
    options = json.loads(env["CONVEYOR_STORAGE_OPTIONS"])
    assert options["key"] == env["MINIO_APP_USER"] != env["MINIO_ROOT_USER"]


def test_placeholders_and_root_keys_are_refused_before_anything_starts() -> None:
    from conveyor.operator import check_secrets

    services = _compose()["services"]
    preflight = services["preflight"]
    assert preflight["command"][:4] == ["python", "-m", "conveyor.operator", "check-secrets"]
    checked = set(preflight["command"][4:])
    text = (INFRA / "compose.yaml").read_text()
    secrets = set(re.findall(r"\$\{([A-Z_]*(?:PASSWORD|AUTH_STRING))\b", text))
    assert secrets and secrets <= checked
    for name, service in services.items():
        if name != "preflight":
            assert service["depends_on"]["preflight"] == {"condition": "service_completed_successfully"}, name

    example = _env_example()
    problems = check_secrets(example, sorted(checked))
    assert len(problems) == len(checked) and all("placeholder" in p for p in problems)
    good = {name: f"{name.lower()}-a-long-random-value" for name in checked}
    good["PREFECT_AUTH_STRING"] = "admin:a-long-random-value"
    good |= {"MINIO_ROOT_USER": "minio-root", "CONVEYOR_STORAGE_OPTIONS": '{"key": "conveyor-app"}'}
    assert check_secrets(good, sorted(checked)) == []
    rooted = good | {"CONVEYOR_STORAGE_OPTIONS": '{"key": "minio-root", "secret": "x"}'}
    assert check_secrets(rooted, sorted(checked)) == [
        "CONVEYOR_STORAGE_OPTIONS uses the MinIO root user; give the app its bucket user"
    ]
    short = good | {"POSTGRES_PASSWORD": "hunter2"}
    assert check_secrets(short, ["POSTGRES_PASSWORD"]) == ["POSTGRES_PASSWORD is shorter than 12 characters"]


def test_uv_comes_from_the_package_index_pinned_by_version_and_hash() -> None:
    lock = (REPO_ROOT / "uv.lock").read_text()
    block = lock[lock.index('[[package]]\nname = "uv"\n') :]
    block = block[: block.index("\n[[package]]", 1)]
    version = re.search(r'^version = "([^"]+)"', block, re.MULTILINE).group(1)
    locked = set(re.findall(r'hash = "sha256:([0-9a-f]{64})"', block))
    assert f'"uv=={version}"' in (REPO_ROOT / "pyproject.toml").read_text()
    for dockerfile in (INFRA / "docker").glob("Dockerfile.*"):
        text = dockerfile.read_text()
        assert not re.search(r"\|\s*(env\s+\S+\s+)*(ba)?sh\b", text), (
            f"{dockerfile.name} pipes a script into sh"
        )
        assert "curl" not in text and "wget" not in text and "astral.sh" not in text, dockerfile.name
        assert f'"uv=={version}"' in text and "--require-hashes" in text, dockerfile.name
        hashes = set(re.findall(r"--hash=sha256:([0-9a-f]{64})", text))
        assert hashes and hashes <= locked, f"{dockerfile.name}: hashes not in uv.lock's uv {version}"
