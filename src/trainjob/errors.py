"""Typed errors. Each carries the process exit code the CLI returns for it.

The codes are a contract with Kubernetes' podFailurePolicy (see k8s/job.yaml):
codes in NON_RETRIABLE fail the Job at once, the rest count against backoffLimit.
"""


class TrainJobError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = 1


class ConfigError(TrainJobError):
    """Bad usage or configuration; retrying cannot help."""

    exit_code = 2


class DataError(TrainJobError):
    """The dataset is unusable: nothing to train on, unsafe archive, too many bad images."""

    exit_code = 3


class StorageError(TrainJobError):
    """Object storage failed after retries: missing bucket, access denied, unreachable."""

    exit_code = 4


class ClusterError(TrainJobError):
    """The workers could not train together: a peer never joined, died or hung. Retriable:
    the Job restarts the group, which resumes from the last save point."""

    exit_code = 4


class TrainingError(TrainJobError):
    """Training itself failed: the loss became NaN, out of memory."""

    exit_code = 5


class LostOwnership(TrainJobError):
    """Another job took the run lock over; this one stopped writing (fencing). Retrying
    would only fight the new holder, so the Job fails at once."""

    exit_code = 6


class ConditionalWritesUnsupported(StorageError):
    """The server refused a conditional write (If-None-Match/If-Match) as not implemented."""


class Preempted(TrainJobError):
    """Stopped by SIGTERM/SIGINT after the resume state was saved (128 + SIGTERM)."""

    exit_code = 143


NON_RETRIABLE = (ConfigError.exit_code, DataError.exit_code, LostOwnership.exit_code)


# Raised by a collective operation, anywhere in a run of several workers (a step, the
# validation figures, variables created or broadcast while the model is built), once a
# peer died, hung past --collective-timeout or aborted.
PEER_FAILURES = ("UnavailableError", "DeadlineExceededError", "CancelledError", "AbortedError")
# TensorFlow's messages may open with "Graph execution error:" and a trace of the graph.
_FRAME = ("Graph execution error", "[[", "Detected at node", "File ", "The error could be",
          "Additional GRPC", "Stack trace", "{{")


def as_job_error(exc: BaseException, where: str = "", *, peers: bool = False) -> BaseException:
    """The typed error for an untyped failure, ``where`` (e.g. "worker 1: ") leading its
    line: out of memory (host or device) and TensorFlow's own failures are TrainingError
    (exit 5); with ``peers`` (several workers), a collective's failure is ClusterError (exit
    4). Typed errors pass through, and anything else stays as it is (exit 1)."""
    if isinstance(exc, TrainJobError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "ResourceExhaustedError":
        return TrainingError(f"{where}out of memory while training: lower --batch-size or "
                             "--image-size")
    if peers and name in PEER_FAILURES:
        return ClusterError(f"{where}a peer worker died or stopped responding: {name}: "
                            f"{first_line(exc)[:200]}; the group must restart, and resumes "
                            "from the last save point")
    if name in ("InvalidArgumentError", "UnknownError", "InternalError"):
        return TrainingError(f"{where}TensorFlow failed while training: {first_line(exc)[:300]}")
    return exc


def first_line(exc: BaseException) -> str:
    """The first line of an error's message that is not part of TensorFlow's frame."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(_FRAME)), type(exc).__name__)
