"""The predictions folder of a run: what a run writes there, its part folders, and their merge.

``DIR`` holds one predictions folder per track (``DIR`` itself for one track), ``errors.jsonl`` and the
run manifest. While a run works, each worker writes into its part folder ``DIR/.parts/rank-<k>/`` (the
same layout); ``finalize`` merges the parts into ``DIR`` in input order, safe to repeat after a kill.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mediround.atomic import atomic_open
from mediround.data.dialogue import Dialogue
from mediround.data.predictions import (
    MASKS_FOLDER,
    PREDICTIONS_FILE,
    complete_dialogue_ids,
    read_predictions_if_any,
    safe_name,
)
from mediround.data.run_manifest import MANIFEST_FILE
from mediround.error_log import ERRORS_FILE, read_error_log, write_error_log
from mediround.errors import DataError
from mediround.inference.chain import RoundPrediction, Track
from mediround.inference.settings import InferenceConfig
from mediround.reports.html import REPORT_FILE
from mediround.reports.overlays import OVERLAYS_FOLDER, write_overlay
from mediround.reports.scoring import METRICS_FILE

PARTS_FOLDER = ".parts"
# What a run writes into a predictions folder (and into each track folder): what --overwrite removes.
RUN_OUTPUTS = (PREDICTIONS_FILE, MASKS_FOLDER, OVERLAYS_FOLDER, METRICS_FILE, REPORT_FILE, ERRORS_FILE,
               MANIFEST_FILE, PARTS_FOLDER)


def parts_root(config: InferenceConfig) -> Path:
    return Path(config.out) / PARTS_FOLDER


def part_root(config: InferenceConfig, rank: int) -> Path:
    """The part folder of worker ``rank``."""
    return parts_root(config) / f"rank-{rank}"


def part_folder(config: InferenceConfig, part: Path, track: Track) -> Path:
    """The predictions folder of ``track`` inside the part folder ``part``."""
    return part / config.track_folder(track).relative_to(config.out)


def remove_run_outputs(folder: Path) -> None:
    """Remove what an earlier run wrote into ``folder`` and its track folders, nothing else."""
    for directory in [folder, *(p for p in folder.iterdir() if p.is_dir() and (p / PREDICTIONS_FILE).exists())]:
        for name in RUN_OUTPUTS:
            path = directory / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def error_record(file: str, item: Any, dialogue_id: str | None, field_name: str | None, reason: str) -> dict:
    """One line of ``errors.jsonl``."""
    return {"file": file, "item": item, "id": dialogue_id, "field": field_name, "reason": reason}


def dialogues_with_problems(problems: Sequence[DataError]) -> int:
    """How many dialogues the load problems skipped: one dialogue may have several problems."""
    return len({(problem.file, problem.item) for problem in problems})


def _problem_record(problem: DataError) -> dict:
    return error_record(problem.file, problem.item, None, problem.field, problem.reason)


def write_overlays(
    config: InferenceConfig, dialogue: Dialogue, image: np.ndarray, results: dict[Track, list[RoundPrediction]]
) -> None:
    """One overlay PNG of ``dialogue`` per track, straight into the track folder."""
    for track, rounds in results.items():
        path = config.track_folder(track) / OVERLAYS_FOLDER / f"{safe_name(dialogue.id)}.png"
        write_overlay(path, dialogue, image, [p.mask for p in rounds])


def finalize(config: InferenceConfig, dialogues: Sequence[Dialogue], problems: Sequence[DataError]) -> int:
    """Merge every part folder into ``DIR`` in input order; returns how many dialogues were skipped.

    Safe to repeat after a kill at any point: masks move with ``os.replace`` (a mask already moved is
    found at its destination), and ``predictions.jsonl``/``errors.jsonl`` are rewritten atomically
    before the parts are removed.
    """
    parts = sorted(p for p in parts_root(config).glob("rank-*") if p.is_dir())
    rounds = {d.id: len(d.rounds) for d in dialogues}
    complete_everywhere: set[str] | None = None
    for track in config.tracks:
        complete = _merge_track(config, track, parts, dialogues, rounds)
        complete_everywhere = complete if complete_everywhere is None else complete_everywhere & complete
    runtime: dict[str, dict] = {}
    for part in parts:
        for record in read_error_log(part / ERRORS_FILE):
            runtime[record["id"]] = record
    if not parts:
        for record in read_error_log(Path(config.out) / ERRORS_FILE):
            if record.get("id") is not None:
                runtime[record["id"]] = record
    failed = [runtime[d.id] for d in dialogues if d.id in runtime and d.id not in (complete_everywhere or set())]
    write_error_log(Path(config.out) / ERRORS_FILE, [_problem_record(p) for p in problems] + failed)
    shutil.rmtree(parts_root(config), ignore_errors=True)
    return dialogues_with_problems(problems) + len(failed)


def _merge_track(
    config: InferenceConfig, track: Track, parts: Sequence[Path], dialogues: Sequence[Dialogue], rounds: dict[str, int]
) -> set[str]:
    """Rewrite one track folder's predictions.jsonl: earlier complete dialogues plus the parts' new ones."""
    folder = config.track_folder(track)
    records = read_predictions_if_any(folder)
    complete = complete_dialogue_ids(records, rounds)
    sources: dict[str, tuple[Path, dict[tuple[str, int], dict]]] = {}
    for part in parts:
        track_part = part_folder(config, part, track)
        part_records = read_predictions_if_any(track_part)
        for dialogue_id in complete_dialogue_ids(part_records, rounds):
            sources[dialogue_id] = (track_part, part_records)
    lines: list[dict] = []
    for dialogue in dialogues:
        n_rounds = len(dialogue.rounds)
        if dialogue.id in sources:
            track_part, part_records = sources[dialogue.id]
            chosen = [part_records[(dialogue.id, number)] for number in range(1, n_rounds + 1)]
            for record in chosen:
                _move_mask(track_part / record["mask"], folder / record["mask"])
        elif dialogue.id in complete:
            chosen = [records[(dialogue.id, number)] for number in range(1, n_rounds + 1)]
        else:
            continue
        lines.extend(chosen)
    (folder / MASKS_FOLDER).mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / PREDICTIONS_FILE) as handle:
        for record in lines:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    kept = {record["mask"] for record in lines}
    for mask in (folder / MASKS_FOLDER).glob("*.png"):
        if f"{MASKS_FOLDER}/{mask.name}" not in kept:
            mask.unlink()
    return {record["id"] for record in lines}


def _move_mask(source: Path, destination: Path) -> None:
    if source.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)
    elif not destination.exists():
        raise DataError(str(source), None, "mask", "predicted mask missing from its part folder")
