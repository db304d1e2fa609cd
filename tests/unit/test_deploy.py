"""The scale-out files (deploy/, the `scale` profile of docker-compose.yml) without an engine or a
cluster: they parse, and they agree with the daemon (probe paths, settings names, user)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mpcapi.config import settings as settings_module

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
NGINX = ROOT / "deploy" / "nginx" / "nginx.conf"
SECRET_NAMES = {"LITELLM_API_KEY", "MPCAPI_ADMIN_KEY", "MPCAPI_DATABASE_URL"}


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def known_variables() -> set[str]:
    """Every variable name the settings read (MPCAPI_*, LITELLM_*, PORT, NODE_ENV)."""
    source = Path(settings_module.__file__).read_text()
    return set(re.findall(r'"((?:MPCAPI|LITELLM)_[A-Z_]+|PORT|NODE_ENV)"', source))


def test_kubernetes_manifests() -> None:
    found = manifests()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= set(found)
    pod = found["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1001
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "mpc-api"
    config = found["ConfigMap"]["data"]
    secret = found["Secret"]["stringData"]
    assert set(config) | set(secret) <= known_variables()
    assert set(secret) == SECRET_NAMES
    assert not SECRET_NAMES & set(config)
    assert all(isinstance(value, str) for value in config.values())


def test_compose_scale_profile() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "profiles" not in services["mpc-api"]  # the default profile is unchanged
    scaled = [name for name, service in services.items() if "scale" in service.get("profiles", [])]
    replicas = [name for name in scaled if name.startswith("mpc-api-") and name[-1].isdigit()]
    assert len(replicas) >= 2
    assert {"redis", "postgres", "mpc-api-lb"} <= set(scaled)
    for name in replicas:
        environment = services[name]["environment"]
        assert environment["MPCAPI_REDIS_URL"].startswith("redis://redis:")
        assert environment["MPCAPI_DATABASE_URL"].startswith("postgresql://")
        assert set(environment) <= known_variables()
    nginx = NGINX.read_text()
    assert set(re.findall(r"server (mpc-api-\d+):3000", nginx)) == set(replicas)


# Volume types a container can write to; configMap, secret, downwardAPI and projected are read-only.
WRITABLE_VOLUMES = {"emptyDir", "persistentVolumeClaim", "ephemeral", "hostPath"}


def image_defaults() -> tuple[dict[str, str], str]:
    """The ENV and WORKDIR of the Dockerfile's final stage: what a pod starts from."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = re.split(r"^FROM\s", text, flags=re.MULTILINE)[-1]
    environment: dict[str, str] = {}
    workdir = "/"
    for line in final.splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction == "ENV":
            environment.update(word.split("=", 1) for word in shlex.split(arguments))
        elif instruction == "WORKDIR":
            workdir = arguments.strip()
    return environment, workdir


def container_environment(
    found: dict[str, dict[str, Any]], container: dict[str, Any]
) -> dict[str, str]:
    """The container's variables as Kubernetes sets them: the image's, then each envFrom source
    in order (a later one wins), then env (which wins over envFrom)."""
    environment, _ = image_defaults()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == found["ConfigMap"]["metadata"]["name"]
            environment.update(found["ConfigMap"]["data"])
        if "secretRef" in source:
            assert source["secretRef"]["name"] == found["Secret"]["metadata"]["name"]
            environment.update(found["Secret"]["stringData"])
    environment.update(
        {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    )
    return environment


def test_kubernetes_writes_only_to_writable_volumes(tmp_path: Path) -> None:
    """With a read-only root filesystem, every file the daemon writes must be on a volume: the
    usage spool (and the refused rows beside it), a SQLite database (and its -wal, -shm files),
    TMPDIR. A spool on the read-only root loses the rows of a database outage."""
    found = manifests()
    pod = found["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    writable = [
        PurePosixPath(mount["mountPath"])
        for mount in container.get("volumeMounts", [])
        if not mount.get("readOnly") and WRITABLE_VOLUMES & set(volumes[mount["name"]])
    ]
    environment = container_environment(found, container)
    # The settings as the daemon reads them (tmp_path: no .env, no TOML file).
    assert settings_module.CONFIG_ENV not in environment
    settings = settings_module.load_settings({}, environment, cwd=tmp_path)
    workdir = PurePosixPath(container.get("workingDir") or image_defaults()[1])

    directories = {"TMPDIR": workdir / environment.get("TMPDIR", "/tmp")}
    directories["MPCAPI_USAGE_SPOOL"] = (workdir / settings.usage_spool).parent
    if settings.database_url.startswith("sqlite:///"):
        database = settings.database_url.removeprefix("sqlite:///").partition("?")[0]
        directories["MPCAPI_DATABASE_URL"] = (workdir / database).parent
    for variable, directory in directories.items():
        assert any(directory.is_relative_to(mount) for mount in writable), (
            f"{variable} writes to {directory}, which is on no writable volume ({writable})"
        )
