"""The fine-tuning schedule: which phase each epoch trains in, the fit calls that run the
phases, and the learning rate a phase starts at. Nothing here imports TensorFlow.

``--freeze-backbone-epochs N`` trains the head alone (HEAD) for epochs 0..N-1, then every
layer (FULL) at ``--fine-tune-learning-rate`` up to ``--epochs``. With N = 0 every epoch is
FULL at ``--learning-rate``, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainjob.config import OptimConfig

HEAD = "head"  # backbone frozen (BatchNorm in inference mode): the classifier head only
FULL = "full"  # every layer trains


@dataclass(frozen=True)
class Segment:
    """One fit call: epochs ``start``..``end - 1`` in ``phase``; ``skip`` batches of
    ``start`` were done before a mid-epoch restart."""

    phase: str
    start: int
    end: int
    skip: int = 0


def phase_at(epoch: int, freeze_epochs: int) -> str:
    return HEAD if epoch < freeze_epochs else FULL


def plan(first_epoch: int, skip: int, freeze_epochs: int, epochs: int) -> list[Segment]:
    """The fit calls from ``first_epoch`` (``skip`` batches into it) to ``epochs``: a
    mid-epoch restart finishes its epoch first, and a phase boundary splits the rest."""
    segments = []
    epoch = first_epoch
    if skip:
        segments.append(Segment(phase_at(epoch, freeze_epochs), epoch, epoch + 1, skip))
        epoch += 1
    boundary = min(freeze_epochs, epochs)
    if epoch < boundary:
        segments.append(Segment(HEAD, epoch, boundary))
        epoch = boundary
    if epoch < epochs:
        segments.append(Segment(FULL, epoch, epochs))
    return segments


def phase_of_record(record: dict | None, freeze_epochs: int) -> str | None:
    """The phase whose optimizer state a resume starts from (None: a fresh start).

    Records without a phase (older trainjob) take it from their last epoch; a resume from
    the last checkpoint has a fresh optimizer, as phase HEAD starts with."""
    if record is None:
        return None
    if freeze_epochs and record.get("from_checkpoint"):
        return HEAD
    if record.get("phase"):
        return record["phase"]
    last = int(record.get("epoch", 0)) - (0 if record.get("step") else 1)
    return phase_at(max(last, 0), freeze_epochs)


def entry_rate(phase: str, previous: str | None, optim: OptimConfig) -> float | None:
    """The learning rate to set on entering ``phase`` after ``previous``; None keeps the
    optimizer's (--learning-rate on a fresh start, the saved rate on a resume)."""
    if phase == FULL and previous == HEAD:
        return optim.fine_tune_rate
    return None
