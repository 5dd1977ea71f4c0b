"""The platforms teams run on (issue #21): Kueue, the termination message, sweeps.

Every variant (k8s/ one pod, k8s/multiworker, k8s/jobset, k8s/sweep) is rendered with
`kubectl kustomize` with components/kueue enabled, and k8s/sweep with each component; the
results are validated strictly against Kubernetes 1.29-1.37 (kubernetes-validate, offline)
like test_k8s.py's. The example queues (components/kueue/queues) are validated against
Kueue's CRD schemas, vendored in tests/fixtures/kueue-*-crd-schema.json from
kubernetes-sigs/kueue v0.19.2 (commit 8eab687, 2026-08-20; scripts/vendor_kueue_schemas.py):
the newest release when this was written, where v1beta2 (the version the examples use) is the
storage version and waitForPodsReady is on by default; v1beta1 is deprecated there. CEL
rules (x-kubernetes-validations) are not evaluated; unknown fields are refused, as the API
server's strict field validation does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers.manifests import (
    COMPONENTS,
    K8S,
    KUBERNETES_VERSIONS,
    ROOT,
    child_job,
    find,
    load_all,
    render,
    require_kustomize,
    same_pod,
    strict_k8s_errors,
    strict_schema,
)

from trainjob import termination
from trainjob.cli import train
from trainjob.errors import NON_RETRIABLE
from trainjob.run import sweep

KUEUE = K8S / "components" / "kueue"
QUEUES = KUEUE / "queues"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_API = "kueue.x-k8s.io/v1beta2"
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
KUEUE_RELEASE = "kubernetes-sigs/kueue v0.19.2"
ENVVARS = {p.envvar for p in train.params if getattr(p, "envvar", None)}


def queue_name(k8s: Path = K8S) -> str:
    """The queue name, from the one place it is written (components/kueue/queue-name.yaml)."""
    [doc] = load_all(k8s / "components" / "kueue" / "queue-name.yaml")
    return doc["labels"][QUEUE_LABEL]


def enable(kustomization: Path, *components: str) -> None:
    """Add components to a (copied) kustomization.yaml."""
    kust = yaml.safe_load(kustomization.read_text())
    kust["components"] = [*kust.get("components", []), *components]
    kustomization.write_text(yaml.safe_dump(kust))


def render_all(k8s: Path, component: str) -> dict[str, list[dict]]:
    """``component`` enabled in each variant of the copied ``k8s`` folder, rendered: k8s/,
    multiworker (and the JobSet built on it), and jobset and sweep on their own."""
    enable(k8s / "kustomization.yaml", f"components/{component}")
    out = {f"base+{component}": render(k8s)}
    enable(k8s / "sweep" / "kustomization.yaml", f"../components/{component}")
    out[f"sweep+{component}"] = render(k8s / "sweep")
    enable(k8s / "jobset" / "kustomization.yaml", f"../components/{component}")
    out[f"jobset+{component}"] = render(k8s / "jobset")  # enabled at the JobSet alone
    enable(k8s / "multiworker" / "kustomization.yaml", f"../components/{component}")
    out[f"multiworker+{component}"] = render(k8s / "multiworker")
    # as docs/kubernetes.md says for every component: in multiworker, which the JobSet copies
    kust = k8s / "jobset" / "kustomization.yaml"
    kust.write_text(kust.read_text().replace(f"components:\n- from-job\n- ../components/"
                                             f"{component}\n", "components:\n- from-job\n"))
    out[f"jobset+{component}@multiworker"] = render(k8s / "jobset")
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every variant with components/kueue, the shipped variants without it, and k8s/sweep
    with each component."""
    require_kustomize()
    out = {"base": render(K8S), "multiworker": render(K8S / "multiworker"),
           "jobset": render(K8S / "jobset"), "sweep": render(K8S / "sweep"),
           "pack": render(K8S / "pack")}
    tmp = tmp_path_factory.mktemp("kueue")
    shutil.copytree(K8S, tmp / "k8s")
    out |= render_all(tmp / "k8s", "kueue")
    for name in COMPONENTS:
        if name == "kueue":
            continue
        tmp = tmp_path_factory.mktemp(f"sweep-{name}")
        shutil.copytree(K8S, tmp / "k8s")
        enable(tmp / "k8s" / "sweep" / "kustomization.yaml", f"../components/{name}")
        out[f"sweep+{name}"] = render(tmp / "k8s" / "sweep")
    return out


def pod_templates(doc: dict) -> list[dict]:
    """The pod templates of a Job or of each replicated Job of a JobSet."""
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    if doc["kind"] == "JobSet":
        return [r["template"]["spec"]["template"] for r in doc["spec"]["replicatedJobs"]]
    return []


# --- schema ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_variants_pass_strict_validation(rendered, version):
    """Every Kubernetes resource of every render, and the Job each JobSet would create."""
    docs = [(name, child_job(doc) if doc["kind"] == "JobSet" else doc)
            for name, rendered_docs in rendered.items() for doc in rendered_docs]
    errors = strict_k8s_errors(docs, version)
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def kueue_validators() -> dict[str, jsonschema.Draft4Validator]:
    out = {}
    for kind in KUEUE_KINDS:
        path = ROOT / "tests" / "fixtures" / f"kueue-{kind.lower()}-crd-schema.json"
        schema = json.loads(path.read_text())
        assert KUEUE_RELEASE in schema["$comment"], path
        assert " v1beta2, from " in schema["$comment"], path
        out[kind] = jsonschema.Draft4Validator(strict_schema(schema))
    return out


def example_queues() -> list[dict]:
    require_kustomize()
    return render(QUEUES)


def test_example_queues_match_kueue_crds(kueue_validators):
    docs = example_queues()
    assert sorted(d["kind"] for d in docs) == sorted(KUEUE_KINDS)
    for doc in docs:
        assert doc["apiVersion"] == KUEUE_API, doc["kind"]
        errors = [f"{doc['kind']}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in kueue_validators[doc["kind"]].iter_errors(doc)]
        assert not errors, "\n".join(errors)


def test_kueue_schema_check_rejects_mistakes(kueue_validators):
    """The validators are not vacuous: a misspelled field, a wrong type, an unknown enum
    value are each refused."""
    docs = {d["kind"]: d for d in example_queues()}
    for kind, path, value in (("LocalQueue", ("spec", "clusterQueues"), "x"),
                              ("ClusterQueue", ("spec", "resourceGroups"), {"cpu": 1}),
                              ("ClusterQueue", ("spec", "queueingStrategy"), "FIFO"),
                              ("ResourceFlavor", ("spec", "nodeLabel"), {"a": "b"})):
        bad = json.loads(json.dumps(docs[kind]))
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert not kueue_validators[kind].is_valid(bad), (kind, path)


def test_example_queues_fit_together_and_admit_a_run(rendered):
    """The LocalQueue is the one the label names and points at the ClusterQueue, whose
    flavor exists and whose quota covers what one pod of each variant asks for."""
    docs = {d["kind"]: d for d in example_queues()}
    local, cluster, flavor = docs["LocalQueue"], docs["ClusterQueue"], docs["ResourceFlavor"]
    assert local["metadata"]["name"] == queue_name()
    assert "namespace" not in local["metadata"], "applied in the Jobs' namespace (-n)"
    assert local["spec"]["clusterQueue"] == cluster["metadata"]["name"]
    [group] = cluster["spec"]["resourceGroups"]
    [flavor_quota] = group["flavors"]
    assert flavor_quota["name"] == flavor["metadata"]["name"]
    quota = {r["name"]: r["nominalQuota"] for r in flavor_quota["resources"]}
    assert set(group["coveredResources"]) == set(quota)
    for name, docs_ in rendered.items():
        for doc in docs_:
            for template in pod_templates(doc):
                for c in template["spec"]["containers"]:
                    requests = c["resources"]["requests"]
                    assert set(requests) <= set(quota), (name, set(requests) - set(quota))
                    for res, amount in requests.items():
                        assert quantity(amount) <= quantity(quota[res]), (name, res)


def quantity(value) -> float:
    """A Kubernetes quantity (1, "4", "16Gi", "500m") as a number."""
    units = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


# --- Kueue ----------------------------------------------------------------------------------

def admitted_objects(docs: list[dict]) -> list[dict]:
    """What Kueue admits: the JobSet when there is one, else the Job."""
    jobsets = [d for d in docs if d["kind"] == "JobSet"]
    return jobsets or [d for d in docs if d["kind"] == "Job"]


def test_kueue_labels_exactly_the_object_kueue_admits(rendered):
    """With the component, the Job (one pod, the workers, the sweep) or the JobSet carries
    the queue label, and nothing else does: not the pods, not the ConfigMap; no suspend
    (Kueue's webhook sets it). Without it, no variant is labelled."""
    queue = queue_name()
    labelled = [n for n in rendered if "+kueue" in n]
    assert sorted(labelled) == sorted(["base+kueue", "multiworker+kueue", "jobset+kueue",
                                       "jobset+kueue@multiworker", "sweep+kueue"])
    for name, docs in rendered.items():
        [target] = admitted_objects(docs)
        expected = queue if name in labelled else None
        assert target["metadata"].get("labels", {}).get(QUEUE_LABEL) == expected, name
        for doc in docs:
            if doc is not target:
                assert QUEUE_LABEL not in doc["metadata"].get("labels", {}), (name, doc["kind"])
            for template in pod_templates(doc):
                assert QUEUE_LABEL not in template["metadata"].get("labels", {}), name
        assert "suspend" not in target["spec"], name


def test_kueue_queue_name_is_written_once(tmp_path):
    """Renaming the queue in queue-name.yaml alone renames it in every variant."""
    require_kustomize()
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    path = k8s / "components" / "kueue" / "queue-name.yaml"
    text, n = re.subn(rf"^(\s+{re.escape(QUEUE_LABEL)}): \S+$", r"\1: team-a",
                      path.read_text(), flags=re.MULTILINE)
    assert n == 1, "queue-name.yaml no longer names the queue in one line"
    path.write_text(text)
    for name, docs in render_all(k8s, "kueue").items():
        [target] = admitted_objects(docs)
        assert target["metadata"]["labels"][QUEUE_LABEL] == "team-a", name


def test_kueue_component_adds_no_resources(rendered):
    """The example queues are for an administrator to apply once; no variant applies them."""
    kust = yaml.safe_load((KUEUE / "kustomization.yaml").read_text())
    assert not kust.get("resources")
    for name, docs in rendered.items():
        assert not KUEUE_KINDS & {d["kind"] for d in docs}, name


# --- the termination message ----------------------------------------------------------------

def test_every_container_falls_back_to_logs(rendered):
    """Every container of every pod of every variant reports trainjob's termination message,
    or its log's tail where a crash left none, from the path the job writes by default."""
    seen = 0
    for name, docs in rendered.items():
        for doc in docs:
            for template in pod_templates(doc):
                for c in (*template["spec"]["containers"],
                          *template["spec"].get("initContainers", [])):
                    seen += 1
                    assert c.get("terminationMessagePolicy") == "FallbackToLogsOnError", \
                        (name, c["name"])
                    assert c.get("terminationMessagePath", "/dev/termination-log") == \
                        termination.DEFAULT_PATH, (name, c["name"])
                    assert termination.ENV not in {e["name"] for e in c.get("env", [])}
    assert seen >= len(rendered)


# --- the sweep ------------------------------------------------------------------------------

def sweep_variants(rendered: dict) -> dict[str, list[dict]]:
    return {name: docs for name, docs in rendered.items() if name.startswith("sweep")}


def sweep_file(docs: list[dict], tmp: Path) -> tuple[Path, str]:
    """The sweep ConfigMap's file written under ``tmp``, and where the pod mounts it."""
    job = find(docs, "Job")
    data = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    settings = find_settings(docs)
    mounted = Path(settings["TRAINJOB_SWEEP_FILE"])
    [c] = job["spec"]["template"]["spec"]["containers"]
    [mount] = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == mounted.parent]
    assert mount.get("readOnly") is True
    [volume] = [v for v in job["spec"]["template"]["spec"]["volumes"]
                if v["name"] == mount["name"]]
    config_map = data[volume["configMap"]["name"]]
    path = tmp / mounted.name
    path.write_text(config_map["data"][mounted.name])
    return path, str(mounted)


def find_settings(docs: list[dict]) -> dict[str, str]:
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and "TRAINJOB_DATA" in d.get("data", {})]
    return cm["data"]


def test_sweep_job_runs_every_trial_and_no_failure_stops_it(rendered, tmp_path):
    """completions = the trials in the sweep file the pods mount; per-trial retries; as
    many failed indexes allowed as there are trials; the job's non-retriable codes fail
    their trial only; preemption is ignored; the pod is the base's, plus the sweep file."""
    base_pod = find(render(K8S), "Job")["spec"]["template"]["spec"]
    for name, docs in sweep_variants(rendered).items():
        spec = find(docs, "Job")["spec"]
        path, _ = sweep_file(docs, tmp_path)
        trials = sweep.load(str(path)).count
        assert spec["completionMode"] == "Indexed", name
        assert spec["completions"] == trials, f"{name}: completions != the sweep's trials"
        assert spec["maxFailedIndexes"] == spec["completions"], name
        assert 1 <= spec["parallelism"] <= spec["completions"], name
        assert "backoffLimit" not in spec and spec["backoffLimitPerIndex"] >= 1, name
        rules = spec["podFailurePolicy"]["rules"]
        assert rules == [
            {"action": "FailIndex", "onExitCodes": {"containerName": "trainjob",
                                                    "operator": "In",
                                                    "values": sorted(NON_RETRIABLE)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                      "status": "True"}]}], name
        pod = json.loads(json.dumps(spec["template"]["spec"]))
        pod["volumes"] = [v for v in pod["volumes"] if "configMap" not in v]
        for c in pod["containers"]:
            c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "sweep"]
        if name in ("sweep", "sweep+kueue"):  # the components change the pod on purpose
            assert same_pod(pod, base_pod), f"{name}: a trial's pod strays from k8s/base's"


def test_sweep_every_trial_gets_its_settings_and_folder(rendered, tmp_path, monkeypatch):
    """The settings each pod gets (the ConfigMap, JOB_COMPLETION_INDEX) make a valid trial:
    its own settings from sweep.json and its own run folder under the sweep's output."""
    for name, docs in sweep_variants(rendered).items():
        settings = find_settings(docs)
        unknown = {k for k in settings if k.startswith("TRAINJOB_")} - ENVVARS
        assert not unknown, f"{name}: not options of `trainjob train`: {unknown}"
        path, _ = sweep_file(docs, tmp_path)
        loaded = sweep.load(str(path))
        for key in [k for k in os.environ if k.startswith("TRAINJOB_")]:
            monkeypatch.delenv(key)
        for key, value in {**settings, "TRAINJOB_SWEEP_FILE": str(path)}.items():
            monkeypatch.setenv(key, str(value))
        outputs = set()
        for index in range(loaded.count):
            params = train.make_context("train", []).params
            cfg = sweep.configure(params, {"JOB_COMPLETION_INDEX": str(index)})
            assert cfg.trial.index == index and cfg.sweep.trial_index == index, name
            assert cfg.output.output == f"{settings['TRAINJOB_OUTPUT']}/trial-{index:03d}"
            for key, value in loaded.trial(index):
                assert dataclass_value(cfg, key) == value, (name, index, key)
            outputs.add(cfg.output.output)
        assert len(outputs) == loaded.count, name


def dataclass_value(cfg, name: str):
    for group in cfg.to_dict().values():
        if name in group:
            return group[name]
    raise KeyError(name)


def test_pack_job_packs_beside_training_on_cpus_alone(rendered):
    """k8s/pack: `trainjob dataset pack SRC DEST` as a Job of its own names (it runs beside
    the training Job, never in its place), on no GPU, failing on the same exit codes."""
    from trainjob.cli import cli
    from trainjob.errors import NON_RETRIABLE

    pack, train = rendered["pack"], rendered["base"]
    for kind in ("Job", "ConfigMap", "ServiceAccount"):
        assert find(pack, kind)["metadata"]["name"] != find(train, kind)["metadata"]["name"]
    job = find(pack, "Job")
    spec = job["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert args[:2] == ["dataset", "pack"]
    ctx = cli.commands["dataset"].commands["pack"].make_context("pack", list(args[2:]))
    assert ctx.params["src"].startswith("s3://") and ctx.params["dest"].endswith("/")
    assert spec["containers"][0]["envFrom"][0]["configMapRef"]["name"] == \
        find(pack, "ConfigMap")["metadata"]["name"]
    assert spec["serviceAccountName"] == find(pack, "ServiceAccount")["metadata"]["name"]
    resources = spec["containers"][0]["resources"]
    assert not any("gpu" in key for part in resources.values() for key in part)
    assert "nodeSelector" not in spec and "tolerations" not in spec
    fail = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert sorted(fail[0]["onExitCodes"]["values"]) == sorted(NON_RETRIABLE)
