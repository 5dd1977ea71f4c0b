"""The multi-worker manifests (issue #8): k8s/multiworker (a headless Service and an Indexed
Job) and k8s/jobset (the same run as a JobSet), rendered through kustomize.

k8s/multiworker is validated like k8s/ (kubernetes-validate --strict, Kubernetes 1.29-1.37);
the JobSet against JobSet's published CRD schema (tests/fixtures/jobset-crd-schema.json, from
kubernetes-sigs/jobset v0.12.0; see its "$comment"), made strict about unknown fields as the
API server's strict field validation is, and its child Job and pod against Kubernetes' own
schemas. The rest checks that the fields which must agree do: N, the Service, the port, the
exit codes, the pod itself, also after N changes and under an overlay's namePrefix.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

# Imported plainly (kubernetes-validate through test_k8s): the test extra installs them
# (jsonschema with kubernetes-validate), and a missing one must fail the run, never skip.
import jsonschema
import pytest
import yaml
from helpers.manifests import (
    COMPONENTS,
    K8S,
    KUBERNETES_VERSIONS,
    ROOT,
    assert_real_options,
    child_job,
    find,
    load_all,
    render,
    require_kustomize,
    same_pod,
    strict_k8s_errors,
    strict_schema,
)

from trainjob.cli import train
from trainjob.config import Config
from trainjob.errors import NON_RETRIABLE, Preempted

MULTIWORKER = K8S / "multiworker"
JOBSET_SCHEMA = ROOT / "tests" / "fixtures" / "jobset-crd-schema.json"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
RJOB = "workers"      # the JobSet's one replicatedJob


# --- rendering ------------------------------------------------------------------------------

def copy_k8s(tmp: Path) -> Path:
    shutil.copytree(K8S, tmp / "k8s")
    return tmp / "k8s"


def overlay(tmp: Path, name: str, target: str, **fields) -> Path:
    """A kustomization beside the copied k8s/: resources [../k8s/<target>] plus fields."""
    path = tmp / name
    path.mkdir()
    (path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": [f"../k8s/{target}"], **fields}))
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """multiworker and jobset as shipped, under an overlay's namePrefix, and with N = 3
    written in the one place the docs name."""
    require_kustomize()
    out = {"multiworker": render(MULTIWORKER), "jobset": render(K8S / "jobset")}
    tmp = tmp_path_factory.mktemp("renamed")
    copy_k8s(tmp)
    for target in ("multiworker", "jobset"):
        out[f"{target}+prefix"] = render(overlay(tmp, target, target, namePrefix="exp1-"))
    tmp = tmp_path_factory.mktemp("three")
    patch = copy_k8s(tmp) / "multiworker" / "job-patch.yaml"
    text, n = re.subn(r"^  parallelism: 2\b", "  parallelism: 3", patch.read_text(),
                      flags=re.MULTILINE)
    assert n == 1, "job-patch.yaml no longer sets spec.parallelism: 2"
    patch.write_text(text)
    out["multiworker+n3"] = render(tmp / "k8s" / "multiworker")
    out["jobset+n3"] = render(tmp / "k8s" / "jobset")
    return out


@pytest.fixture(scope="module")
def with_components(tmp_path_factory) -> dict[str, list[dict]]:
    """Each component of k8s/components enabled in k8s/multiworker, rendered as the Job
    and as the JobSet (which copies the Job's pod)."""
    require_kustomize()
    out = {}
    for name in COMPONENTS:
        tmp = tmp_path_factory.mktemp(f"with-{name}")
        k = copy_k8s(tmp) / "multiworker" / "kustomization.yaml"
        kust = yaml.safe_load(k.read_text())
        kust["components"] = [f"../components/{name}"]
        k.write_text(yaml.safe_dump(kust))
        out[f"multiworker+{name}"] = render(k.parent)
        out[f"jobset+{name}"] = render(tmp / "k8s" / "jobset")
    return out


def variants_of(rendered: dict, kind: str) -> dict[str, list[dict]]:
    return {name: docs for name, docs in rendered.items() if name.startswith(kind)}


def job_spec(docs: list[dict]) -> dict:
    """The Indexed Job's spec: the Job itself, or the JobSet's one replicatedJob's."""
    jobsets = [d for d in docs if d["kind"] == "JobSet"]
    if jobsets:
        [rjob] = jobsets[0]["spec"]["replicatedJobs"]
        return rjob["template"]["spec"]
    return find(docs, "Job")["spec"]


def pod(docs: list[dict]) -> dict:
    return job_spec(docs)["template"]["spec"]


def container(docs: list[dict]) -> dict:
    [c] = pod(docs)["containers"]
    return c


def settings(docs: list[dict]) -> dict[str, str]:
    return find(docs, "ConfigMap")["data"]


# --- schema ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobset_validator():
    schema = json.loads(JOBSET_SCHEMA.read_text())
    assert "kubernetes-sigs/jobset v0.12.0" in schema["$comment"]
    # OpenAPI v3.0 schema objects follow JSON Schema draft 4/5 (boolean exclusiveMinimum).
    return jsonschema.Draft4Validator(strict_schema(schema))


def test_jobset_matches_published_crd_schema(rendered, jobset_validator):
    for name, docs in variants_of(rendered, "jobset").items():
        jobset = find(docs, "JobSet")
        assert jobset["apiVersion"] == JOBSET_API
        errors = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jobset_validator.iter_errors(jobset)]
        assert not errors, "\n".join(errors)


def test_jobset_schema_check_rejects_mistakes(rendered, jobset_validator):
    """The validator above is not vacuous: a misspelled field, a wrong type and an unknown
    failure-policy action are each refused."""
    jobset = find(rendered["jobset"], "JobSet")
    for path, value in ((("spec", "failurePolicy", "maxRestart"), 3),
                        (("spec", "network", "enableDNSHostnames"), "yes"),
                        (("spec", "failurePolicy", "rules", 0, "action"), "FailJob")):
        bad = copy.deepcopy(jobset)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert not jobset_validator.is_valid(bad), path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_multiworker_passes_strict_validation(rendered, with_components, version):
    """Every built-in resource of every variant, and the Job each JobSet creates (its pod
    template is checked against Kubernetes' schema, not only JobSet's copy of it)."""
    docs = []
    for name, rendered_docs in {**rendered, **with_components}.items():
        for doc in rendered_docs:
            if doc["kind"] == "JobSet":
                docs.append((f"{name} (child Job)", child_job(doc)))
            else:
                docs.append((name, doc))
    errors = strict_k8s_errors(docs, version)
    assert not errors, "\n".join(errors)


def test_components_render_over_multiworker(with_components, jobset_validator):
    """A component enabled in k8s/multiworker reaches the JobSet's pod too."""
    for name in COMPONENTS:
        job, jobset = with_components[f"multiworker+{name}"], with_components[f"jobset+{name}"]
        assert jobset_validator.is_valid(find(jobset, "JobSet")), name
        assert same_pod(pod(job), pod(jobset)), f"{name}: the JobSet's pod is not the Job's"
        env = {e["name"] for e in container(jobset).get("env", [])}
        if name == "irsa":
            assert "AWS_ACCESS_KEY_ID" not in env
        if name == "multi-gpu":
            assert container(jobset)["resources"]["limits"]["nvidia.com/gpu"] == 4
        if name == "minio":
            assert settings(jobset)["AWS_ENDPOINT_URL"].startswith("http")


# --- the Indexed Job ------------------------------------------------------------------------

def test_kinds(rendered):
    for name, docs in variants_of(rendered, "multiworker").items():
        assert sorted(d["kind"] for d in docs) == [
            "ConfigMap", "Job", "Service", "ServiceAccount"], name
    # JobSet creates its Job and headless Service itself: the source Job and Service are gone.
    for name, docs in variants_of(rendered, "jobset").items():
        assert sorted(d["kind"] for d in docs) == [
            "ConfigMap", "JobSet", "ServiceAccount"], name


def test_worker_count_agrees_everywhere(rendered):
    """N is written once (job-patch.yaml's parallelism): completions, TRAINJOB_WORKERS and
    the JobSet follow it, also when it is changed (the +n3 renders)."""
    for name, docs in rendered.items():
        spec = job_spec(docs)
        n = 3 if name.endswith("+n3") else 2
        assert spec["completionMode"] == "Indexed", name
        assert spec["parallelism"] == spec["completions"] == n, name
        assert settings(docs)["TRAINJOB_WORKERS"] == str(n), name
        batch = int(settings(docs)["TRAINJOB_BATCH_SIZE"])
        if not name.endswith("+n3"):   # the example's batch is sized for its 2 workers
            assert batch % n == 0, f"{name}: the global batch must divide by the workers"


def test_one_gpu_per_worker_and_the_base_pod(rendered):
    """Each worker is the base's pod (image, ServiceAccount, ConfigMap and Secret wiring,
    security context, volumes, grace period, one GPU) plus its subdomain and port."""
    base = pod(render(K8S))
    for name, docs in rendered.items():
        res = container(docs)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1, name
        assert same_pod(pod(docs), base), f"{name}: the worker pod strays from k8s/base's"
        assert pod(docs)["restartPolicy"] == "Never", name


def test_failure_policy_restarts_the_group(rendered):
    """A crashed worker fails its index; the survivors exit 4 within the collective time-out
    and are retried too: the budget is per index (so it does not shrink as N grows), the
    first index out of retries fails the Job (maxFailedIndexes 0, the others are stopped),
    and a replacement never overlaps its predecessor (same hostname)."""
    base_grace = pod(render(K8S))["terminationGracePeriodSeconds"]
    for name, docs in variants_of(rendered, "multiworker").items():
        spec = job_spec(docs)
        assert "backoffLimit" not in spec, name   # per index instead
        assert spec["backoffLimitPerIndex"] >= 1, name
        assert spec["maxFailedIndexes"] == 0, name
        assert spec["podReplacementPolicy"] == "Failed", name
        assert_pod_failure_rules(name, docs)
        assert pod(docs)["terminationGracePeriodSeconds"] == base_grace, name
        assert 0 < float(settings(docs)["TRAINJOB_GRACE_SECONDS"]) < base_grace, name


def assert_pod_failure_rules(name: str, docs: list[dict]) -> None:
    rules = job_spec(docs)["podFailurePolicy"]["rules"]
    c = container(docs)["name"]
    assert rules[0]["action"] == "FailJob", f"{name}: the non-retriable codes come first"
    assert rules[0]["onExitCodes"] == {"containerName": c, "operator": "In",
                                       "values": sorted(NON_RETRIABLE)}, name
    assert rules[1:] == [
        # the group's agreed stop after a peer's SIGTERM: no retry spent
        {"action": "Ignore", "onExitCodes": {"containerName": c, "operator": "In",
                                             "values": [Preempted.exit_code]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                  "status": "True"}]},
    ], name


def test_headless_service_selects_exactly_the_job(rendered):
    for name, docs in variants_of(rendered, "multiworker").items():
        svc, job = find(docs, "Service"), find(docs, "Job")
        assert svc["spec"]["clusterIP"] == "None", name
        assert svc["spec"]["publishNotReadyAddresses"] is True, name
        # The label the Job controller puts on this Job's pods only (never on another Job's).
        assert svc["spec"]["selector"] == {
            "batch.kubernetes.io/job-name": job["metadata"]["name"]}, name
        assert pod(docs)["subdomain"] == svc["metadata"]["name"], name
        assert settings(docs)["TRAINJOB_WORKER_SERVICE"] == svc["metadata"]["name"], name
        [port] = svc["spec"]["ports"]
        [cport] = container(docs)["ports"]
        assert port["targetPort"] == cport["name"], name
        assert port["port"] == cport["containerPort"] == int(
            settings(docs)["TRAINJOB_WORKER_PORT"]), name


def test_references_resolve(rendered):
    """The pod's ConfigMap and ServiceAccount are the rendered ones, under a namePrefix too
    (kustomize does not know a JobSet's fields: k8s/jobset/kustomizeconfig.yaml)."""
    for name, docs in rendered.items():
        assert container(docs)["envFrom"] == [
            {"configMapRef": {"name": find(docs, "ConfigMap")["metadata"]["name"]}}], name
        assert pod(docs)["serviceAccountName"] == find(
            docs, "ServiceAccount")["metadata"]["name"], name
    assert find(rendered["jobset+prefix"], "JobSet")["metadata"]["name"] == "exp1-trainjob"


def worker_addresses(pattern: str, own_hostname: str, own_index: int, n: int,
                     service: str, port: int) -> list[str]:
    """The peers' addresses as issue #8 specifies the pattern: {job} is this pod's hostname
    without its -<JOB_COMPLETION_INDEX> suffix, {port} = port + index, and :port appended
    when the pattern names none."""
    assert own_hostname.endswith(f"-{own_index}")
    job = own_hostname.removesuffix(f"-{own_index}")
    out = []
    for i in range(n):
        host = pattern.format(job=job, index=i, service=service, port=port + i)
        out.append(host if re.search(r":\d+$", host) else f"{host}:{port}")
    return out


def test_worker_hosts_are_the_pods_dns_names(rendered):
    """From every worker, the pattern gives each peer's DNS name: <hostname>.<subdomain>,
    hostname = <job>-<index> for an Indexed Job's pod, and for a JobSet's
    <jobset>-<replicatedJob>-<jobIndex>-<podIndex> (its Job is <jobset>-<rjob>-<jobIndex>)."""
    for name, docs in rendered.items():
        data = settings(docs)
        n, port = int(data["TRAINJOB_WORKERS"]), int(data["TRAINJOB_WORKER_PORT"])
        if name.startswith("jobset"):
            jobset = find(docs, "JobSet")
            assert jobset["spec"]["network"]["enableDNSHostnames"] is True, name
            subdomain = jobset["spec"]["network"]["subdomain"]
            assert pod(docs)["subdomain"] == subdomain, name
            job_name = f"{jobset['metadata']['name']}-{RJOB}-0"
        else:
            subdomain = pod(docs)["subdomain"]
            job_name = find(docs, "Job")["metadata"]["name"]
        assert data["TRAINJOB_WORKER_SERVICE"] == subdomain, name
        expected = [f"{job_name}-{i}.{subdomain}:{port}" for i in range(n)]
        for k in range(n):
            assert worker_addresses(data["TRAINJOB_WORKER_HOSTS"], f"{job_name}-{k}", k, n,
                                    data["TRAINJOB_WORKER_SERVICE"], port) == expected, name


# --- the JobSet -----------------------------------------------------------------------------

def test_jobset_restarts_the_whole_group(rendered):
    job = find(rendered["multiworker"], "Job")["spec"]
    for name, docs in variants_of(rendered, "jobset").items():
        spec = find(docs, "JobSet")["spec"]
        [rjob] = spec["replicatedJobs"]
        assert rjob["name"] == RJOB and rjob["replicas"] == 1, name
        child = rjob["template"]["spec"]
        # Any failure fails the child Job at once, and the JobSet recreates every worker
        assert child["backoffLimit"] == 0, name
        assert child["podReplacementPolicy"] == "Failed", name
        assert child["activeDeadlineSeconds"] == job["activeDeadlineSeconds"], name
        assert_pod_failure_rules(name, docs)
        policy = spec["failurePolicy"]
        assert policy["maxRestarts"] >= 1, name
        assert policy["restartStrategy"] == "BlockingRecreate", name
        # ... except for the non-retriable exits: the child Job fails with reason
        # PodFailurePolicy only through its FailJob rule (exit 2, 3, 6).
        assert policy["rules"][0]["action"] == "FailJobSet", name
        assert "PodFailurePolicy" in policy["rules"][0]["onJobFailureReasons"], name
        assert "DeadlineExceeded" in policy["rules"][0]["onJobFailureReasons"], name
        assert all(r["action"] == "FailJobSet" for r in policy["rules"]), name
        assert spec["ttlSecondsAfterFinished"] == job["ttlSecondsAfterFinished"], name


def test_jobset_owner_id_survives_group_restarts(rendered):
    """A group restart recreates the child Job (a new controller-uid): the run lock's owner
    is the JobSet's uid, which JobSet puts on every pod as a label."""
    for name, docs in variants_of(rendered, "jobset").items():
        env = {e["name"]: e for e in container(docs)["env"]}
        assert env["TRAINJOB_OWNER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['jobset.sigs.k8s.io/jobset-uid']", name
    env = {e["name"]: e for e in container(rendered["multiworker"])["env"]}
    assert "controller-uid" in env["TRAINJOB_OWNER_ID"]["valueFrom"]["fieldRef"]["fieldPath"]


# --- consistency with the code --------------------------------------------------------------

def multiworker_settings() -> dict[str, dict[str, str]]:
    out = {}
    for path in sorted(MULTIWORKER.glob("*.yaml")) + sorted((K8S / "jobset").rglob("*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") == "ConfigMap":
                out[str(path.relative_to(K8S))] = doc["data"]
    return out


def test_multiworker_keys_are_real_options(rendered):
    found = multiworker_settings()
    assert found, "no ConfigMap patch in k8s/multiworker?"
    found |= {name: settings(docs) for name, docs in rendered.items()}
    assert_real_options(found)


def test_multiworker_settings_parse(rendered, monkeypatch):
    for name, docs in rendered.items():
        if name.endswith("+n3"):
            continue   # its batch (64) is the example's, sized for 2 workers
        for key in [k for k in os.environ if k.startswith("TRAINJOB_")]:
            monkeypatch.delenv(key)
        for key, value in settings(docs).items():
            monkeypatch.setenv(key, str(value))
        ctx = train.make_context("train", [])
        assert ctx.params["workers"] == int(settings(docs)["TRAINJOB_WORKERS"]), name
        Config.from_options(**ctx.params)
