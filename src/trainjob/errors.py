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
