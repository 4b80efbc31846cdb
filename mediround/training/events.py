"""What a training run reports while it runs: one dataclass per event, delivered to the caller's handler
(on the main process) and written to ``train_log.jsonl``.

A handler matches on the event's type. ``kind`` is the event's name in the training log and ``record()``
its fields there; the log's line format (``{"event": kind, "time": ..., **record()}``) is what benchmarks
and earlier runs read, so a record keeps the flat keys the log has always had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

# The validation tracks of stage 1 (``validation.parquet``'s ``track`` column): the masks of the training
# forward, and the masks of rounds chained from the model's own earlier masks.
TEACHER_FORCED_TRACK = "teacher_forced"
CHAINED_TRACK = "chained"


@dataclass
class Event:
    """Base of every training event."""

    kind: ClassVar[str]
    measurement: ClassVar[bool] = False

    def record(self) -> dict:
        """The event's fields as the training log holds them."""
        return dataclasses.asdict(self)

    def scalars(self) -> dict[str, float]:
        """What experiment trackers (``log.report_to``) receive: the numbers of a measurement (a logged step,
        a validation) as ``kind/field``, the values its training-log line holds; nothing for other events."""
        if not self.measurement:
            return {}
        return {f"{self.kind}/{key}": float(value) for key, value in self.record().items()
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


EventHandler = Callable[[Event], None]


@dataclass
class WeightsLoaded(Event):
    """``--allow-partial-load``: what each weight file of the model lacked or added (``LoadReport`` dicts)."""

    kind: ClassVar[str] = "load"
    reports: list[dict]


@dataclass
class RunStarted(Event):
    """The run is set up: its size, where it resumes from, and the dialogues skipped for bad data."""

    kind: ClassVar[str] = "start"
    step: int
    total_steps: int
    world_size: int
    global_batch: int
    recipe_hash: str
    resumed_from: str | None
    train_dialogues: int
    val_dialogues: int
    data_problems: list[str]


@dataclass
class JCMRunStarted(RunStarted):
    """A stage-2 run started; ``rollout_fraction`` is the share of dialogues trained on rollout features."""

    rollout: bool = False
    rollout_fraction: float = 0.0


@dataclass
class StepLogged(Event):
    """One optimizer step's global-batch loss, its weighted parts (``components``), LR, gradient norm and speed."""

    kind: ClassVar[str] = "step"
    measurement: ClassVar[bool] = True
    step: int
    loss: float
    components: dict[str, float]
    lr: float
    grad_norm: float
    samples_per_s: float
    epoch: int

    def record(self) -> dict:
        record = dataclasses.asdict(self)
        return {**record.pop("components"), **record}


@dataclass
class StepSkipped(Event):
    """A step with a non-finite loss or gradient was dropped (``train.skip_nonfinite``)."""

    kind: ClassVar[str] = "skip"
    step: int
    reason: str
    where: str


@dataclass
class TrackScores:
    """Dice, gIoU and cIoU of one validation track over all rounds, and the Dice of each round (1-based)."""

    dice: float
    giou: float
    ciou: float
    rounds: dict[int, float]


@dataclass
class Validated(Event):
    """A stage-1 validation: the scores of each track that ran (``TEACHER_FORCED_TRACK``, ``CHAINED_TRACK``),
    the mean teacher-forced loss and the number of masks scored."""

    kind: ClassVar[str] = "validation"
    measurement: ClassVar[bool] = True
    step: int
    tracks: dict[str, TrackScores]
    loss: float
    masks: int

    def record(self) -> dict:
        record = {"step": self.step}
        for track, scores in self.tracks.items():
            prefix = "" if track == TEACHER_FORCED_TRACK else f"{track}_"
            record.update({f"{prefix}{key}": value for key, value in dataclasses.asdict(scores).items()})
        return {**record, "loss": self.loss, "masks": self.masks}


@dataclass
class ChainedScores:
    """Dice, gIoU and cIoU of chained predictions over ``masks`` ground-truth masks."""

    dice: float
    giou: float
    ciou: float
    masks: int


@dataclass
class JCMValidated(Event):
    """A stage-2 validation: Spearman of judge score vs true IoU per feature source, and the chained
    predictions with JCM off and at ``beta`` (with the share of rounds JCM refined)."""

    kind: ClassVar[str] = "validation"
    measurement: ClassVar[bool] = True
    step: int
    beta: float
    spearman: dict[str, float]
    off: ChainedScores
    jcm: ChainedScores
    refined_share: float

    def record(self) -> dict:
        record = {"step": self.step, "beta": self.beta, "refined_share": self.refined_share}
        record.update({f"spearman_{source}": value for source, value in self.spearman.items()})
        for name in ("off", "jcm"):
            record.update({f"{name}_{key}": value for key, value in dataclasses.asdict(getattr(self, name)).items()})
        return record


@dataclass
class CheckpointSaved(Event):
    """A checkpoint folder got its final name."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass
class BestKept(Event):
    """A validation scored higher than every earlier one on ``checkpoint.keep_best``'s ``metric`` (over all
    rounds of the ``best_of`` track): its model is now the best checkpoint at ``path``."""

    kind: ClassVar[str] = "best"
    step: int
    metric: str
    best_of: str
    value: float
    path: str


@dataclass
class RunEnded(Event):
    """The run finished or was interrupted; ``model`` is the new MediRound checkpoint when it finished."""

    kind: ClassVar[str] = "end"
    step: int
    stopped: str
    checkpoint: str | None
    model: str | None
    skipped_steps: int = 0
