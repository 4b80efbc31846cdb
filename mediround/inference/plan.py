"""The first phase of a run: what it will predict, given what its folder already holds.

``load_plan`` loads the dialogues, refuses a folder that holds an earlier run unless ``--resume``
(continue it: the run manifest must show the same settings and data) or ``--overwrite`` (replace it),
writes this run's manifest (``mediround.data.run_manifest``), folds any work a killed run left in the part
folders into ``DIR``, and lists the dialogues still to predict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mediround import __version__
from mediround.atomic import write_json
from mediround.data.dialogue import Dialogue
from mediround.data.formats import load_dialogues
from mediround.data.predictions import PREDICTIONS_FILE, complete_dialogue_ids, read_predictions_if_any
from mediround.data.run_manifest import (
    MANIFEST_FILE,
    data_sha256,
    model_manifest_sha256,
    referenced_files_sha256,
    utc_now,
)
from mediround.errors import DataError
from mediround.inference.outputs import finalize, parts_root, remove_run_outputs
from mediround.inference.settings import InferenceConfig


@dataclass
class Plan:
    """The dialogues of the data file, the load problems, and the indices still to predict."""

    dialogues: list[Dialogue]
    problems: list[DataError]
    todo: list[int]
    already_done: int
    data_format: str


def load_plan(config: InferenceConfig) -> Plan:
    """Load the dialogues and decide which still need predicting (merging a killed run's parts first)."""
    loaded = load_dialogues(config.data, root=config.root, allow_outside_root=config.allow_outside_root)
    out = Path(config.out)
    existing = [config.track_folder(t) / PREDICTIONS_FILE for t in config.tracks]
    if config.resume and config.overwrite:
        raise DataError(str(out), None, None, "--resume continues the run in this folder and --overwrite replaces "
                        "it: pass one")
    earlier = any(p.exists() for p in existing) or parts_root(config).exists() or (out / MANIFEST_FILE).exists()
    if earlier and config.overwrite:
        remove_run_outputs(out)
    elif earlier and not config.resume:
        raise DataError(str(out), None, None, "already holds predictions: pass --resume to continue that run, "
                        "--overwrite to replace it, or choose another folder")
    _check_same_run(config, loaded.dialogues)
    done: set[str] = set()
    if config.resume:
        finalize(config, loaded.dialogues, loaded.problems)
        rounds = {d.id: len(d.rounds) for d in loaded.dialogues}
        done_per_track = [
            complete_dialogue_ids(read_predictions_if_any(config.track_folder(t)), rounds) for t in config.tracks
        ]
        done = set.intersection(*done_per_track)
    todo = [index for index, dialogue in enumerate(loaded.dialogues) if dialogue.id not in done]
    return Plan(loaded.dialogues, loaded.problems, todo, len(loaded.dialogues) - len(todo), loaded.format)


def run_settings(config: InferenceConfig, dialogues: Sequence[Dialogue]) -> dict:
    """The settings that decide what a run predicts (``dialogues``: those loaded from ``config.data``); a
    resumed run must use the same."""
    return {
        "data": os.path.abspath(config.data),
        "data_sha256": data_sha256(config.data),
        "data_files_sha256": referenced_files_sha256(dialogues),
        "model": os.path.abspath(config.model),
        "model_manifest_sha256": model_manifest_sha256(config.model),
        "betas": list(config.betas),
        "teacher_forcing": list(config.teacher_forcing),
        "generate": config.generate,
    }


def check_settings(settings: dict, earlier: dict, source: str, what: str) -> None:
    """Raise ``DataError`` naming every one of ``settings`` (``run_settings``) that differs from ``earlier``
    (a manifest)."""
    changed = sorted(key for key in settings if earlier.get(key) != settings[key])
    if changed:
        raise DataError(source, None, changed[0], f"{what} "
                        f"({', '.join(f'{k}: {earlier.get(k)!r} -> {settings[k]!r}' for k in changed)})")


def _check_same_run(config: InferenceConfig, dialogues: Sequence[Dialogue]) -> None:
    """Refuse to resume a folder written with other settings or data; write this run's manifest
    (``mediround.data.run_manifest``), its end time still unknown."""
    path = Path(config.out) / MANIFEST_FILE
    settings = run_settings(config, dialogues)
    started = utc_now()
    if config.resume and path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        check_settings(settings, earlier, str(path), "--resume with other settings than the run being resumed")
        started = earlier.get("started", started)
    write_json(path, {**settings, "mediround_version": __version__, "started": started, "finished": None})


def record_finish(config: InferenceConfig, shards: list[dict]) -> dict:
    """Stamp the end time and the completion marks of this run's shards into the run manifest; returns it."""
    path = Path(config.out) / MANIFEST_FILE
    manifest = {**json.loads(path.read_text(encoding="utf-8")), "finished": utc_now(), "shards": shards}
    write_json(path, manifest)
    return manifest
