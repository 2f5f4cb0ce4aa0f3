"""docker-compose.yml: the services a team deploys, and that each one runs a command the CLI accepts.

No Docker here: the file is read as YAML (anchors and merge keys resolved as compose resolves them), and
each service's command is handed to `pipeline.cli.main` with the part that would start work replaced by
a recorder, so a renamed flag or a config key a stage no longer knows fails here, not in a deployment.
"""

from __future__ import annotations

import importlib
import re

import pytest
import yaml
from conftest import REPO

from pipeline import cli
from pipeline.config import build
from pipeline.job import load_job

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]


def volume_of(service: dict, container_path: str) -> str | None:
    """The named volume mounted at `container_path` (or above it) in a service, if any."""
    for mount in service.get("volumes", []):
        volume, _, target = mount.partition(":")
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return volume
    return None


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_services_a_team_deploys():
    assert {"minio", "bucket", "app", "job", "job-gpu"} <= set(SERVICES)
    app, job, gpu = SERVICES["app"], SERVICES["job"], SERVICES["job-gpu"]
    for name in ("app", "job", "job-gpu"):
        environment = SERVICES[name]["environment"]
        assert environment["RLHF_STORE"].startswith("s3://"), f"{name} must use the shared bucket"
        assert environment["AWS_ENDPOINT_URL_S3"] == "http://minio:9000", name
        assert SERVICES[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully", name
    # The label database is SQLite: on a local volume of the app's own, never on the object store.
    db_volume = volume_of(app, flag(app["command"], "--db"))
    assert db_volume is not None and db_volume not in {volume_of(job, "/runs"), "minio"}
    assert all(volume_of(SERVICES[other], "/labels") is None for other in ("job", "job-gpu", "minio"))
    # The job's run folders are where a killed job resumes, and the app reads curves from the path each
    # artifact records: the same volume at the same path in both.
    runs = flag(job["command"], "--output_dir")
    assert volume_of(app, runs) is not None and volume_of(app, runs) == volume_of(job, runs)
    # GPUs are reserved for the GPU job only, whose image needs no compiler (it samples with `hf`).
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["profiles"] == ["gpu"] and "deploy" not in job
    assert job["build"]["args"]["CPU_KERNEL"] == "1" and gpu["build"]["args"]["CPU_KERNEL"] == "0"


def test_every_required_variable_is_in_the_env_example():
    required = set(re.findall(r"\$\{(\w+):\?", (REPO / "docker-compose.yml").read_text(encoding="utf-8")))
    example = (REPO / ".env.example").read_text(encoding="utf-8")
    defined = {
        line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")
    }
    assert required and required <= defined, f"missing from .env.example: {sorted(required - defined)}"


@pytest.mark.parametrize("service", ["job", "job-gpu"])
def test_the_job_command_parses_and_its_stage_configs_build(service, monkeypatch, tmp_path):
    command = SERVICES[service]["command"]
    assert command[:2] == ["rlhf", "run"]
    seen = {}
    monkeypatch.setattr(
        "pipeline.job.run_job", lambda path, overrides, modules: seen.update(path=path, overrides=overrides)
    )
    monkeypatch.chdir(REPO)  # the image's WORKDIR holds configs/ as the repository does
    assert cli.main(command[1:]) == 0
    job, values = load_job(seen["path"], seen["overrides"], list(cli.STAGE_MODULES))
    assert job.output_dir == "/runs"
    assert set(values) == {"sft", "reward", "ppo"}
    for stage, stage_values in values.items():
        module = importlib.import_module(cli.STAGE_MODULES[stage])
        build(module.Config, stage_values | {"store": str(tmp_path), "output_dir": job.output_dir}, stage)


def test_the_app_command_parses(monkeypatch, tmp_path):
    command = SERVICES["app"]["command"]
    assert command[:2] == ["rlhf", "app"]
    # Container paths become folders here; everything else is the command as the service runs it.
    argv = [str(tmp_path / arg.lstrip("/")) if arg.startswith("/") else arg for arg in command[1:]]
    (tmp_path / "labels").mkdir()
    monkeypatch.setenv("RLHF_STORE", str(tmp_path / "store"))
    launched = {}
    monkeypatch.setattr("pipeline.app.server.launch", lambda settings, **where: launched.update(where))
    monkeypatch.setattr("torch.set_num_threads", lambda threads: None)  # leave this process's threads be
    assert cli.main(argv) == 0
    assert launched == {"host": "0.0.0.0", "port": 7860}
