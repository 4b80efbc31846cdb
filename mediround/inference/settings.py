"""The settings of one ``mediround infer`` run (``InferenceConfig``): every value checked on load, a JSON
round trip so that re-launched workers read the same, and the folder each track writes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from mediround.inference import DEFAULT_BATCH_SIZE
from mediround.inference.chain import Track
from mediround.reports.scoring import TrackFolder
from mediround.typed import load_typed, typed_config


def _distinct(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError(f"repeats a value: {list(values)}")
    return values


def _device_name(name: str) -> str:
    if re.fullmatch(r"cpu|cuda(:\d+)?", name) is None:
        raise ValueError("expected 'cpu', 'cuda' or 'cuda:N'")
    return name


Beta = Annotated[float, Field(ge=0.0, le=1.0)]
"""A JCM threshold: q > beta decodes the raw [SEG], otherwise the refined one."""


@typed_config
@dataclass
class InferenceConfig:
    """Everything one ``mediround infer`` run needs; JSON round trip so re-launched workers read the same.

    ``batch_size`` dialogues advance together round by round (``mediround.inference.chain.chain_batched``; the
    ``use_cache=False`` path runs one at a time). ``betas`` empty means the default: ``DEFAULT_BETA`` when
    the checkpoint has trained JCM weights, else JCM off (``checkpoint_policy.resolve_betas``). ``None`` in
    ``betas`` is a JCM-off track. ``allow_partial_load`` loads a
    checkpoint whose weight files miss or add keys (what was left random is in the summary's load reports).
    ``overwrite`` removes an earlier run's outputs from ``out`` first (``resume`` continues it instead).
    ``num_processes`` runs per machine, on ``num_machines`` machines (``machine_rank`` is this one; the
    others reach machine rank 0 at ``main_process_ip:main_process_port``); ``shard_timeout`` (seconds) is
    how long a process that finished its shard waits for the others.
    Build it from outside input with ``from_dict``, which checks every value.
    """

    data: str
    model: str
    out: str
    betas: Annotated[tuple[Beta | None, ...], AfterValidator(_distinct)] = ()
    teacher_forcing: Annotated[tuple[bool, ...], Field(min_length=1), AfterValidator(_distinct)] = (False,)
    generate: bool = False
    use_cache: bool = True
    jcm_rounds: Literal["all", "referred"] | None = None
    resume: bool = False
    overwrite: bool = False
    overlays: bool = False
    root: str | None = None
    allow_outside_root: bool = False
    device: Annotated[str, AfterValidator(_device_name)] = "cpu"
    num_processes: Annotated[int, Field(ge=1)] = 1
    num_machines: Annotated[int, Field(ge=1)] = 1
    machine_rank: Annotated[int, Field(ge=0)] = 0
    main_process_ip: str | None = None
    main_process_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    shard_timeout: Annotated[float, Field(gt=0)] = 1800.0
    allow_partial_load: bool = False
    batch_size: Annotated[int, Field(ge=1)] = DEFAULT_BATCH_SIZE

    @property
    def tracks(self) -> list[Track]:
        return [Track(beta, forced) for forced in self.teacher_forcing for beta in self.betas]

    def track_folder(self, track: Track) -> Path:
        """``DIR`` itself for a single-track run, else ``DIR/<track label>``."""
        out = Path(self.out)
        return out if len(self.tracks) == 1 else out / track.label

    @property
    def track_folders(self) -> list[TrackFolder]:
        """Each track's predictions folder, as scoring (``mediround.reports.scoring.score_run``) takes it."""
        return [TrackFolder(t.label, self.track_folder(t), t.beta, t.references) for t in self.tracks]

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> InferenceConfig:
        """The checked settings of ``data`` (lists for tuples, as JSON writes them); ``source`` names
        where they came from in the one-line ``RecipeError`` about a bad value."""
        return load_typed(cls, data, source)
