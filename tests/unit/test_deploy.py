"""The scale-out files (deploy/, the `scale` profile of docker-compose.yml) without an engine or a
cluster: they parse, and they agree with the daemon (probe paths, settings names, user)."""

from __future__ import annotations

import re
from pathlib import Path
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
