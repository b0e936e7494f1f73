"""The compose file, the Dockerfile and .env.example agree with each other and with the project.

No Docker engine runs here: Debian's ``docker-compose`` validates the file against the Compose
Specification (``docker-compose config`` needs no engine), and the rest is read as YAML.
"""

import importlib
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery

from app.settings import Settings
from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
LETHE_IMAGES = {"${DEPLOY_IMAGE:-lethe}:api", "${DEPLOY_IMAGE:-lethe}:worker"}
SERVICES = {"postgres", "redis", "migrate", "api", "worker", "worker-cpu", "scheduler", "flower"}


def services() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return found


def env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def dockerfile_commands() -> dict[str, list[str]]:
    """Each build target's CMD (the exec form, as JSON)."""
    commands, target = {}, ""
    for line in DOCKERFILE.read_text().splitlines():
        if match := re.match(r"FROM \S+ AS (\S+)", line):
            target = match.group(1)
        elif line.startswith("CMD "):
            commands[target] = json.loads(line.removeprefix("CMD "))
    return commands


def pyproject_extras() -> dict[str, list[str]]:
    extras: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    return extras


def assert_command_exists(argv: list[str]) -> None:
    """``lethe …`` parses with the real CLI; ``celery -A module:app …`` names a Celery app."""
    if argv[0] == "lethe":
        build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown command
        return
    assert argv[:2] == ["celery", "-A"], argv
    module, attribute = argv[2].split(":")
    assert isinstance(getattr(importlib.import_module(module), attribute), Celery)
    if argv[3] == "flower":  # a plugin of the celery command: the api image must install it
        assert any(d.startswith("flower") for d in pyproject_extras().get("ops", [])), (
            "Flower runs in the api image, which installs the `ops` extra: add flower to it"
        )
    else:
        assert argv[3] in {"worker", "inspect"}, argv


def test_compose_file_validates_against_the_compose_specification(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("needs Debian's docker-compose to validate: run `make system-deps`")
    for source, name in ((COMPOSE_FILE, COMPOSE_FILE.name), (DOCKERFILE, DOCKERFILE.name)):
        shutil.copyfile(source, tmp_path / name)
    shutil.copyfile(ENV_EXAMPLE, tmp_path / ".env")  # what an operator starts from
    profiles = ["--profile", "gpu", "--profile", "cpu"]
    result = subprocess.run(
        ["docker-compose", *profiles, "config", "--services"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == SERVICES


def test_every_command_exists_in_the_project() -> None:
    for service in services().values():
        if service.get("image") in LETHE_IMAGES:
            assert_command_exists(service["command"])
    for command in dockerfile_commands().values():
        assert_command_exists(command)
    assert set(dockerfile_commands()) == {"api", "worker"}


def test_startup_order_waits_for_health_and_migrations() -> None:
    found = services()
    assert set(found) == SERVICES
    for name, service in found.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            )
            assert condition == {"condition": expected}, name
            assert dependency in {"migrate", "postgres", "redis"}
    for long_running in ("api", "worker", "worker-cpu", "scheduler"):
        assert "migrate" in found[long_running]["depends_on"], long_running
    assert found["migrate"]["restart"] == "no"


def test_data_services_are_durable_and_checked() -> None:
    found = services()
    assert "postgres-data:/var/lib/postgresql/data" in found["postgres"]["volumes"]
    redis_command = " ".join(found["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    for name in ("postgres", "redis", "flower"):
        assert found[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name
    # The images' own HEALTHCHECK (HTTP on 8000) does not fit these: each opts out explicitly.
    assert found["migrate"]["healthcheck"] == {"disable": True}
    assert found["scheduler"]["healthcheck"] == {"disable": True}
    assert DOCKERFILE.read_text().count("HEALTHCHECK ") == 2


def test_gpu_worker_reserves_gpus_and_the_cpu_worker_is_the_same_otherwise() -> None:
    found = services()
    gpu, cpu = found["worker"], found["worker-cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    same = {k: v for k, v in gpu.items() if k not in {"deploy", "profiles"}}
    assert same == {k: v for k, v in cpu.items() if k != "profiles"}
    assert gpu["image"] == "${DEPLOY_IMAGE:-lethe}:worker"
    assert found["api"]["image"] == "${DEPLOY_IMAGE:-lethe}:api"


def test_images_run_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    for target in ("api", "worker"):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "\nUSER lethe\n" in stage, target
    assert "torch" not in "".join(pyproject_extras().get("ops", []))  # the api image stays slim


def test_env_example_documents_every_variable_and_only_real_settings() -> None:
    documented = env_example()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    assert used - set(documented) == set(), "add these to .env.example"
    settings = {f"LETHE_{name.upper()}" for name in Settings.model_fields}
    lethe_names = {name for name in documented if name.startswith("LETHE_")}
    assert lethe_names - settings == set(), "not a Lethe setting (misspelt?)"
    # The URLs are built by compose from the parts above; a value here would be overridden.
    assert {"LETHE_DATABASE_URL", "LETHE_BROKER_URL"}.isdisjoint(documented)
