"""Run Algorithm 1 over a data file: sharding over processes, resume, skipped dialogues, atomic outputs.

Every run, with one process or many, goes through the same three phases, so an N-process run writes
exactly what a 1-process run writes:

1. ``load_plan``: load the dialogues, fold any work left by a killed run into the output folders, and
   decide which dialogues still need predicting (``--resume`` skips those complete in every track).
2. ``run_shard``: worker ``rank`` of ``world`` predicts dialogues ``rank, rank + world, ...`` of that list
   into its own part folder ``DIR/.parts/rank-<k>/`` (a predictions folder per track, plus
   ``errors.jsonl`` and ``progress.jsonl``); lines are appended and fsynced, masks written atomically.
   A shard ends with its completion mark ``done.json``. Several processes are re-launched workers
   (``run_worker``): global rank 0 reads the plan its parent wrote and broadcasts it over gloo, so every
   worker, on every machine, predicts from the same plan; then they wait for each other (a barrier).
3. ``finalize``: the parts are merged into ``DIR`` in input order (``predictions.jsonl`` rewritten
   atomically, masks moved), ``errors.jsonl`` rewritten, parts removed.

Across machines (``num_machines`` > 1, one ``mediround infer`` per machine) only machine rank 0 plans and
merges; the others only launch their workers (``join_inference``). ``DIR`` must be one folder shared by
every machine (a network file system), and the data and model must be at the same paths everywhere:
workers of other machines refuse data or a model whose SHA-256 differs from machine rank 0's. Machine rank
0 merges only once every shard's completion mark is there; otherwise it names the shards that did not
complete and merges nothing, and ``--resume`` (on every machine) keeps their finished dialogues.

A run killed at any moment leaves complete files only; the next ``--resume`` merges what finished and
predicts the rest. A dialogue that is only partly written counts as not done and is predicted again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch.distributed as dist
from pydantic import AfterValidator, Field

from mediround import __version__
from mediround.atomic import append_jsonl_line, atomic_open, write_json
from mediround.data.dialogue import Dialogue
from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.data.predictions import (
    MASKS_FOLDER,
    PREDICTIONS_FILE,
    PredictionWriter,
    complete_dialogue_ids,
    read_predictions,
    safe_name,
)
from mediround.data.run_manifest import (
    MANIFEST_FILE,
    data_sha256,
    model_manifest_sha256,
    referenced_files_sha256,
    utc_now,
)
from mediround.error_log import ERRORS_FILE, read_error_log, write_error_log
from mediround.errors import CheckpointError, DataError, LaunchError, RecipeError
from mediround.inference import DEFAULT_BATCH_SIZE, DEFAULT_BETA
from mediround.inference.chain import (
    ChainOutcome,
    RoundPrediction,
    Track,
    chain_batched,
    chain_dialogue,
    check_dialogue,
)
from mediround.inference.events import InferenceEvents
from mediround.launch import LaunchPlan, join_process_group, plan_launch, relaunch
from mediround.model.checkpoint import load_checkpoint
from mediround.model.config import MediRoundConfig
from mediround.model.load_report import LoadReport
from mediround.reports.html import REPORT_FILE
from mediround.reports.overlays import OVERLAYS_FOLDER, write_overlay
from mediround.reports.scoring import SCORED_DATA_KEY, EvalConfig, evaluate_predictions
from mediround.typed import load_typed, typed_config

PARTS_FOLDER = ".parts"
PROGRESS_FILE = "progress.jsonl"
WORKER_PLAN_FILE = "plan.json"
SHARD_DONE_FILE = "done.json"
# A network file system may show another machine's new file only after its attribute cache expires
# (NFS: acdirmax, 60 s by default), so rank 0 looks that long for marks that its barrier says exist.
SHARED_FOLDER_LAG_S = 60.0
METRICS_FILE = "metrics.parquet"
# What a run writes into a predictions folder (and into each track folder): what --overwrite removes.
RUN_OUTPUTS = (PREDICTIONS_FILE, MASKS_FOLDER, OVERLAYS_FOLDER, METRICS_FILE, REPORT_FILE, ERRORS_FILE,
               MANIFEST_FILE, PARTS_FOLDER)


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
    ``use_cache=False`` path runs one at a time). ``betas`` empty means the default: ``DEFAULT_BETA`` when the checkpoint has trained JCM weights, else
    JCM off (``resolve_betas``). ``None`` in ``betas`` is a JCM-off track. ``allow_partial_load`` loads a
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
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> InferenceConfig:
        """The checked settings of ``data`` (lists for tuples, as JSON writes them); ``source`` names
        where they came from in the one-line ``RecipeError`` about a bad value."""
        return load_typed(cls, data, source)


@dataclass
class Plan:
    """The dialogues of the data file, the load problems, and the indices still to predict."""

    dialogues: list[Dialogue]
    problems: list[DataError]
    todo: list[int]
    already_done: int
    data_format: str


@dataclass
class InferenceSummary:
    """What a run did: counts for the end-of-run table and the folders it wrote."""

    total: int
    predicted: int
    resumed: int
    skipped: int
    seg_missing: int
    folders: dict[str, str] = field(default_factory=dict)
    errors_file: str = ""
    config: InferenceConfig | None = None
    load_reports: list[LoadReport] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    """The run manifest written into the folder (``mediround.data.run_manifest``)."""


def error_record(file: str, item: Any, dialogue_id: str | None, field_name: str | None, reason: str) -> dict:
    """One line of ``errors.jsonl``."""
    return {"file": file, "item": item, "id": dialogue_id, "field": field_name, "reason": reason}


def _dialogues_with_problems(problems: Sequence[DataError]) -> int:
    """How many dialogues the load problems skipped: one dialogue may have several problems."""
    return len({(problem.file, problem.item) for problem in problems})


def _problem_record(problem: DataError) -> dict:
    return error_record(problem.file, problem.item, None, problem.field, problem.reason)


def _parts_root(config: InferenceConfig) -> Path:
    return Path(config.out) / PARTS_FOLDER


def _part_root(config: InferenceConfig, rank: int) -> Path:
    return _parts_root(config) / f"rank-{rank}"


def _part_folder(config: InferenceConfig, part: Path, track: Track) -> Path:
    return part / config.track_folder(track).relative_to(config.out)


def load_plan(config: InferenceConfig) -> Plan:
    """Load the dialogues and decide which still need predicting (merging a killed run's parts first)."""
    loaded = load_dialogues(config.data, root=config.root, allow_outside_root=config.allow_outside_root)
    out = Path(config.out)
    existing = [config.track_folder(t) / PREDICTIONS_FILE for t in config.tracks]
    if config.resume and config.overwrite:
        raise DataError(str(out), None, None, "--resume continues the run in this folder and --overwrite replaces "
                        "it: pass one")
    earlier = any(p.exists() for p in existing) or _parts_root(config).exists() or (out / MANIFEST_FILE).exists()
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
            complete_dialogue_ids(_read_or_empty(config.track_folder(t)), rounds) for t in config.tracks
        ]
        done = set.intersection(*done_per_track)
    todo = [index for index, dialogue in enumerate(loaded.dialogues) if dialogue.id not in done]
    return Plan(loaded.dialogues, loaded.problems, todo, len(loaded.dialogues) - len(todo), loaded.format)


def remove_run_outputs(folder: Path) -> None:
    """Remove what an earlier run wrote into ``folder`` and its track folders, nothing else."""
    for directory in [folder, *(p for p in folder.iterdir() if p.is_dir() and (p / PREDICTIONS_FILE).exists())]:
        for name in RUN_OUTPUTS:
            path = directory / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _run_settings(config: InferenceConfig, dialogues: Sequence[Dialogue]) -> dict:
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


def _check_settings(settings: dict, earlier: dict, source: str, what: str) -> None:
    """Raise ``DataError`` naming every one of ``settings`` (``_run_settings``) that differs from ``earlier``
    (a manifest)."""
    changed = sorted(key for key in settings if earlier.get(key) != settings[key])
    if changed:
        raise DataError(source, None, changed[0], f"{what} "
                        f"({', '.join(f'{k}: {earlier.get(k)!r} -> {settings[k]!r}' for k in changed)})")


def _check_same_run(config: InferenceConfig, dialogues: Sequence[Dialogue]) -> None:
    """Refuse to resume a folder written with other settings or data; write this run's manifest
    (``mediround.data.run_manifest``), its end time still unknown."""
    path = Path(config.out) / MANIFEST_FILE
    settings = _run_settings(config, dialogues)
    started = utc_now()
    if config.resume and path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        _check_settings(settings, earlier, str(path), "--resume with other settings than the run being resumed")
        started = earlier.get("started", started)
    write_json(path, {**settings, "mediround_version": __version__, "started": started, "finished": None})


def _record_finish(config: InferenceConfig, shards: list[dict]) -> dict:
    """Stamp the end time and the completion marks of this run's shards into the run manifest; returns it."""
    path = Path(config.out) / MANIFEST_FILE
    manifest = {**json.loads(path.read_text(encoding="utf-8")), "finished": utc_now(), "shards": shards}
    write_json(path, manifest)
    return manifest


def _read_or_empty(folder: Path) -> dict[tuple[str, int], dict]:
    return read_predictions(folder) if (folder / PREDICTIONS_FILE).exists() else {}


def _reference_truth(dialogue: Dialogue, file: str, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Ground-truth masks of every referred round (for teacher-forcing tracks), checked against the image."""
    truth = {}
    for number, round_ in enumerate(dialogue.rounds, start=1):
        if round_.ref is None or round_.ref in truth:
            continue
        field_name = f"rounds[{round_.ref - 1}].mask"
        path = dialogue.mask_path(round_.ref)
        if path is None:
            raise DataError(file, _item(dialogue), field_name, f"teacher forcing needs the ground-truth mask "
                            f"of round {round_.ref} (round {number} refers to it)")
        try:
            mask = load_mask(path)
        except DataError as error:
            raise DataError(file, _item(dialogue), field_name, f"{error.file}: {error.reason}") from None
        if mask.shape != shape:
            raise DataError(file, _item(dialogue), field_name, f"mask size {mask.shape[1]}x{mask.shape[0]} "
                            f"differs from the image's {shape[1]}x{shape[0]}")
        truth[round_.ref] = mask
    return truth


def _item(dialogue: Dialogue) -> Any:
    return dialogue.item if dialogue.item is not None else dialogue.id


def prepare_dialogue(dialogue: Dialogue, config: InferenceConfig) -> tuple[np.ndarray, dict[int, np.ndarray] | None]:
    """Check the references, decode the image and (for teacher forcing) read the referred rounds' masks."""
    check_dialogue(dialogue, config.data, generate=config.generate)
    try:
        image = load_image(dialogue.image_path)
    except DataError as error:
        raise DataError(config.data, _item(dialogue), "image", f"{error.file}: {error.reason}") from None
    truth = _reference_truth(dialogue, config.data, image.shape[:2]) if any(config.teacher_forcing) else None
    return image, truth


def predict_dialogue(
    model: Any, dialogue: Dialogue, config: InferenceConfig
) -> tuple[dict[Track, list[RoundPrediction]], np.ndarray]:
    """Prepare ``dialogue`` and chain its rounds for every track of ``config``."""
    image, truth = prepare_dialogue(dialogue, config)
    results = chain_dialogue(
        model, dialogue, image, config.tracks,
        generate=config.generate, use_cache=config.use_cache, reference_truth=truth, jcm_rounds=config.jcm_rounds,
    )
    return results, image


def predict_dialogues(model: Any, dialogues: Sequence[Dialogue], config: InferenceConfig) -> Iterator[ChainOutcome]:
    """Every dialogue's outcome: ``config.batch_size`` at a time in finishing order, or one by one in order
    (batch size 1, or ``use_cache=False``). A dialogue that fails is an outcome with its ``DataError``."""
    if config.batch_size > 1 and config.use_cache:
        yield from chain_batched(model, dialogues, lambda dialogue: prepare_dialogue(dialogue, config), config.tracks,
                                 batch_size=config.batch_size, generate=config.generate,
                                 jcm_rounds=config.jcm_rounds, file=config.data)
        return
    for dialogue in dialogues:
        try:
            results, image = predict_dialogue(model, dialogue, config)
        except DataError as error:
            yield ChainOutcome(dialogue, None, None, error)
        else:
            yield ChainOutcome(dialogue, results, image)


def _counter(on_progress: Callable[[int], None]) -> Callable[[], None]:
    finished = 0

    def advance() -> None:
        nonlocal finished
        finished += 1
        on_progress(finished)

    return advance


def run_shard(
    config: InferenceConfig,
    plan: Plan,
    model: Any,
    rank: int = 0,
    world: int = 1,
    on_done: Callable[[], None] | None = None,
    machine_rank: int = 0,
) -> None:
    """Predict this worker's share of ``plan.todo`` (every ``world``-th from ``rank``) into its part folder.

    Each finished dialogue (predicted or skipped) adds one line to the part's progress file; the shard
    ends with its completion mark (rank, world size, machine rank, dialogues).
    """
    part = _part_root(config, rank)
    dialogues = [plan.dialogues[index] for index in plan.todo[rank::world]]
    writers = {track: PredictionWriter(_part_folder(config, part, track)) for track in config.tracks}
    try:
        with open(part / ERRORS_FILE, "a", encoding="utf-8") as errors, \
                open(part / PROGRESS_FILE, "a", encoding="utf-8") as progress:
            for outcome in predict_dialogues(model, dialogues, config):
                dialogue, error = outcome.dialogue, outcome.error
                if error is not None:
                    append_jsonl_line(errors, error_record(error.file, error.item, dialogue.id, error.field, error.reason))
                else:
                    for track, rounds in outcome.results.items():
                        for prediction in rounds:
                            writers[track].write(dialogue.id, prediction.round, prediction.mask,
                                                 **prediction.record_fields())
                    if config.overlays:
                        _write_overlay(config, dialogue, outcome.image, outcome.results)
                append_jsonl_line(progress, {"id": dialogue.id})
                if on_done is not None:
                    on_done()
    finally:
        for writer in writers.values():
            writer.close()
    write_json(part / SHARD_DONE_FILE, {"rank": rank, "world_size": world, "machine_rank": machine_rank,
                                        "dialogues": len(dialogues)})


def _write_overlay(
    config: InferenceConfig, dialogue: Dialogue, image: np.ndarray, results: dict[Track, list[RoundPrediction]]
) -> None:
    for track, rounds in results.items():
        path = config.track_folder(track) / OVERLAYS_FOLDER / f"{safe_name(dialogue.id)}.png"
        write_overlay(path, dialogue, image, [p.mask for p in rounds])


def finalize(config: InferenceConfig, dialogues: Sequence[Dialogue], problems: Sequence[DataError]) -> int:
    """Merge every part folder into ``DIR`` in input order; returns how many dialogues were skipped.

    Safe to repeat after a kill at any point: masks move with ``os.replace`` (a mask already moved is
    found at its destination), and ``predictions.jsonl``/``errors.jsonl`` are rewritten atomically
    before the parts are removed.
    """
    parts = sorted(p for p in _parts_root(config).glob("rank-*") if p.is_dir())
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
    shutil.rmtree(_parts_root(config), ignore_errors=True)
    return _dialogues_with_problems(problems) + len(failed)


def _merge_track(
    config: InferenceConfig, track: Track, parts: Sequence[Path], dialogues: Sequence[Dialogue], rounds: dict[str, int]
) -> set[str]:
    """Rewrite one track folder's predictions.jsonl: earlier complete dialogues plus the parts' new ones."""
    folder = config.track_folder(track)
    records = _read_or_empty(folder)
    complete = complete_dialogue_ids(records, rounds)
    sources: dict[str, tuple[Path, dict[tuple[str, int], dict]]] = {}
    for part in parts:
        part_folder = _part_folder(config, part, track)
        part_records = _read_or_empty(part_folder)
        for dialogue_id in complete_dialogue_ids(part_records, rounds):
            sources[dialogue_id] = (part_folder, part_records)
    lines: list[dict] = []
    for dialogue in dialogues:
        n_rounds = len(dialogue.rounds)
        if dialogue.id in sources:
            part_folder, part_records = sources[dialogue.id]
            chosen = [part_records[(dialogue.id, number)] for number in range(1, n_rounds + 1)]
            for record in chosen:
                _move_mask(part_folder / record["mask"], folder / record["mask"])
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


def scored_manifest(config: InferenceConfig) -> dict:
    """The run manifest of ``config.out``, plus the data its predictions are scored against (the same):
    the file metadata of its metric rows."""
    manifest = json.loads((Path(config.out) / MANIFEST_FILE).read_text(encoding="utf-8"))
    return {**manifest, "scored_data": manifest["data"], SCORED_DATA_KEY: manifest["data_sha256"]}


def score_outputs(config: InferenceConfig) -> dict[str, Any]:
    """Score each track's predictions against the ground truth, writing ``metrics.parquet`` beside them.

    Only dialogues that were predicted are scored (skipped ones are in ``errors.jsonl``). Returns
    ``{track label: Evaluation}``; empty when no predicted dialogue carries a ground-truth mask.
    """
    loaded = load_dialogues(config.data, root=config.root, allow_outside_root=config.allow_outside_root)
    with_truth = [d for d in loaded.dialogues if any(r.mask is not None for r in d.rounds)]
    manifest = scored_manifest(config)
    evaluations = {}
    for track in config.tracks:
        folder = config.track_folder(track)
        predicted = {dialogue_id for dialogue_id, _ in _read_or_empty(folder)}
        scored = [d for d in with_truth if d.id in predicted]
        if scored:
            scoring = EvalConfig(out=folder / METRICS_FILE, beta=track.beta, references=track.references,
                                 manifest=manifest)
            evaluations[track.label] = evaluate_predictions(scored, folder, scoring)
    return evaluations


def model_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder of ``path``: the folder itself, or its ``model/`` (a training run's output)."""
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        return folder / "model"
    return folder


def checkpoint_has_trained_jcm(model_config: Any) -> bool:
    """Whether a model config says its JCM weights were trained (``train-jcm`` saves ``trainable.jcm``)."""
    return bool(model_config.trainable.jcm)


def resolve_betas(config: InferenceConfig, model_config: Any | None = None) -> InferenceConfig:
    """Fill in the default threshold and refuse numeric thresholds on a checkpoint whose JCM is untrained.

    ``model_config`` defaults to the checkpoint's ``config.json`` (read without loading weights); a training
    run's output folder stands for its ``model/`` checkpoint.
    """
    if model_config is None:
        config = replace(config, model=str(model_folder(config.model)))
        path = Path(config.model) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{config.model}: not a MediRound checkpoint (no config.json)")
        try:
            model_config = MediRoundConfig.from_json(path)
        except RecipeError as error:
            raise CheckpointError(f"{path}: {error}") from None
    return replace(config, betas=checked_betas(config.betas, model_config, config.model))


def checked_betas(betas: tuple[float | None, ...], model_config: Any, model: str) -> tuple[float | None, ...]:
    """``betas``, or the default when empty (``DEFAULT_BETA`` with trained JCM weights, else off);
    ``CheckpointError`` for a numeric threshold on the checkpoint ``model`` whose JCM is untrained."""
    trained = checkpoint_has_trained_jcm(model_config)
    if not betas:
        return (DEFAULT_BETA,) if trained else (None,)
    numeric = [b for b in betas if b is not None]
    if numeric and not trained:
        raise CheckpointError(f"{model}: the checkpoint has no trained JCM weights (run `mediround "
                              f"train-jcm`), so --beta {numeric[0]:g} would use random MLPs; use --beta off")
    return betas


def load_model(config: InferenceConfig) -> Any:
    """The checkpoint of ``config.model`` on ``config.device``, in eval mode."""
    return load_checkpoint(config.model, device=config.device, allow_partial=config.allow_partial_load).eval()


def run_inference(
    config: InferenceConfig, model: Any = None, events: InferenceEvents | None = None
) -> InferenceSummary:
    """Predict every dialogue of ``config.data`` into ``config.out`` (one process, or re-launched workers).

    ``events`` hears of the plan before work starts and of each finished dialogue.
    The summary carries the load reports of the model this process loaded (none when workers loaded it).
    Ctrl-C first merges the dialogues finished so far into ``DIR``, then lets ``KeyboardInterrupt`` go on.
    """
    config = resolve_betas(config, None if model is None else model.config)
    events = events or InferenceEvents()
    plan = load_plan(config)
    events.planned(plan)
    _parts_root(config).mkdir(parents=True, exist_ok=True)
    load_reports: list[LoadReport] = []
    try:
        # The workers of other machines wait for this machine's in the rendezvous: launch them even with
        # nothing to predict, or those machines would wait until the rendezvous times out.
        if config.world_size > 1 and (plan.todo or config.num_machines > 1):
            _launch_workers(config, plan, events)
        elif plan.todo:
            model = model if model is not None else load_model(config)
            load_reports = list(getattr(model, "load_reports", []))
            run_shard(config, plan, model, on_done=_counter(events.progressed))
    except KeyboardInterrupt:
        if config.num_machines == 1:
            # Other machines may still be writing their parts: then --resume merges, not this.
            finalize(config, plan.dialogues, plan.problems)
        raise
    shards = _shard_marks(config)
    skipped = finalize(config, plan.dialogues, plan.problems)
    skipped_at_load = _dialogues_with_problems(plan.problems)
    manifest = _record_finish(config, shards)
    seg_missing = 0
    folders = {}
    for track in config.tracks:
        folder = config.track_folder(track)
        folders[track.label] = str(folder)
        seg_missing += sum(1 for r in read_predictions(folder).values() if r.get("seg_found") is False)
    return InferenceSummary(
        total=len(plan.dialogues) + skipped_at_load,
        predicted=len(plan.todo) - (skipped - skipped_at_load),
        resumed=plan.already_done,
        skipped=skipped,
        seg_missing=seg_missing,
        folders=folders,
        errors_file=str(Path(config.out) / ERRORS_FILE),
        config=config,
        load_reports=load_reports,
        manifest=manifest,
    )


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _shard_marks(config: InferenceConfig) -> list[dict]:
    """The completion marks of the shards in the part folders, by rank."""
    marks = [json.loads(path.read_text(encoding="utf-8")) for path in _parts_root(config).glob(f"rank-*/{SHARD_DONE_FILE}")]
    return sorted(marks, key=lambda mark: mark["rank"])


def _launch_plan(config: InferenceConfig) -> LaunchPlan:
    return plan_launch(
        gpus=None if config.device == "cpu" else config.num_processes,
        cpu=config.device == "cpu",
        num_processes=config.num_processes,
        num_machines=config.num_machines,
        machine_rank=config.machine_rank,
        main_process_ip=config.main_process_ip,
        main_process_port=config.main_process_port,
    )


def _relaunch_workers(config: InferenceConfig, launch: LaunchPlan, events: InferenceEvents) -> None:
    """Re-launch ``mediround infer --worker-plan`` as this machine's processes of ``launch`` and wait;
    ``events`` hears the number of dialogues finished in every part folder."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            events.progressed(sum(_count_lines(p / PROGRESS_FILE) for p in _parts_root(config).glob("rank-*")))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        relaunch(launch, ["infer", "--worker-plan", str(_parts_root(config) / WORKER_PLAN_FILE)]
                 + (["--allow-partial-load"] if config.allow_partial_load else []))
    finally:
        stop.set()
        watcher.join()


def _launch_workers(config: InferenceConfig, plan: Plan, events: InferenceEvents) -> None:
    """Write the plan (config, the indices to predict, the run manifest), re-launch this machine's workers
    and wait until every shard, on every machine, has its completion mark.

    The workers never re-plan or merge; this process merges after they exit. A shard without its mark
    (its process failed, its machine stopped, or its machine writes into another folder) is named in a
    ``LaunchError`` and nothing is merged.
    """
    launch = _launch_plan(config)
    manifest = json.loads((Path(config.out) / MANIFEST_FILE).read_text(encoding="utf-8"))
    write_json(_parts_root(config) / WORKER_PLAN_FILE, {"config": config.to_dict(), "todo": plan.todo,
                                                        "manifest": manifest})
    try:
        _relaunch_workers(config, launch, events)
    except LaunchError as error:
        # A process may fail after its shard is complete (e.g. it gave up waiting for a slower machine):
        # with every mark there, the predictions are whole and are merged.
        if _missing_shards(config, launch.world_size):
            raise LaunchError(_incomplete_message(config, plan, launch, "did not complete: its process failed "
                                                  "or its machine stopped (see that machine's messages)")) from error
        return
    # The barrier passed, so every worker finished its shard: a missing mark was written where this machine
    # cannot see it (yet).
    deadline = time.monotonic() + min(SHARED_FOLDER_LAG_S, config.shard_timeout)
    while _missing_shards(config, launch.world_size) and time.monotonic() < deadline:
        time.sleep(1.0)
    if _missing_shards(config, launch.world_size):
        raise LaunchError(_incomplete_message(
            config, plan, launch, f"finished, but its files are not in {_parts_root(config)} as this machine sees "
            "it: the output folder must be one folder shared by every machine (a network file system), at the "
            "same path"))


def _missing_shards(config: InferenceConfig, world: int) -> list[int]:
    return [rank for rank in range(world) if not (_part_root(config, rank) / SHARD_DONE_FILE).exists()]


def _incomplete_message(config: InferenceConfig, plan: Plan, launch: LaunchPlan, reason: str) -> str:
    """One line per shard without its completion mark, then what was kept and how to go on."""
    world = launch.world_size
    lines = []
    for rank in _missing_shards(config, world):
        part = _part_root(config, rank)
        lines.append(f"shard rank-{rank} of {world} (machine rank {launch.machine_of_rank(rank)}) {reason}; "
                     f"{_count_lines(part / PROGRESS_FILE)} of its {len(plan.todo[rank::world])} dialogue(s) "
                     f"done in {part}")
    return "\n".join(lines) + ("\nnothing was merged into the predictions folder: run the same command with "
                               "--resume (on every machine) to keep the finished dialogues and predict the rest")


def join_inference(config: InferenceConfig, events: InferenceEvents | None = None) -> None:
    """Machine rank > 0 of a multi-machine run: launch this machine's workers, which predict their shards
    of the plan that machine rank 0 makes (and broadcasts), and wait. Machine rank 0 merges."""
    _relaunch_workers(config, _launch_plan(config), events or InferenceEvents())


def _read_worker_plan(plan_file: str | os.PathLike) -> dict:
    try:
        with open(plan_file, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(str(plan_file), None, None, f"unreadable worker plan: {error}") from None


def run_worker(plan_file: str | os.PathLike) -> list[LoadReport]:
    """The body of one re-launched worker: predict its shard of the plan and wait for the other shards;
    returns the load reports of its model.

    Global rank 0 reads ``plan_file`` (written by ``_launch_workers`` on its machine) and broadcasts it,
    so the other machines need neither the file nor a plan of their own. Their workers check that their
    data and model are those machine rank 0 planned with.
    """
    rank, world = join_process_group()
    shared = [_read_worker_plan(plan_file) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    saved = shared[0]
    config = InferenceConfig.from_dict(saved["config"], str(plan_file))
    # Set by torchrun (Accelerate's launcher) in every worker: the rank of this worker's machine.
    machine_rank = int(os.environ.get("GROUP_RANK", "0"))
    # One check per other machine (its first process): the hashes read every data file and image.
    loaded = load_dialogues(config.data, root=config.root, allow_outside_root=config.allow_outside_root)
    if machine_rank > 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _check_settings(_run_settings(config, loaded.dialogues), saved["manifest"], config.data,
                        f"machine rank {machine_rank} sees other data or another model than machine rank 0")
    if config.device != "cpu":
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    plan = Plan(loaded.dialogues, loaded.problems, saved["todo"], 0, loaded.format)
    model = load_model(config)
    run_shard(config, plan, model, rank=rank, world=world, machine_rank=machine_rank)
    # Every worker waits for every other: a process that failed or whose machine stopped makes this raise
    # (at once when its connection closes, else after shard_timeout), so machine rank 0 never merges early.
    dist.monitored_barrier(timeout=timedelta(seconds=config.shard_timeout), wait_all_ranks=True)
    dist.destroy_process_group()
    return list(model.load_reports)
