"""Run Algorithm 1 over a data file: ``run_inference``, one process or many, start to end.

Every run, with one process or many, goes through the same three phases, so an N-process run writes
exactly what a 1-process run writes:

1. plan (``plan.load_plan``): load the dialogues, fold any work left by a killed run into the output
   folders, and decide which dialogues still need predicting (``--resume`` skips those complete in every
   track).
2. predict (``sharding.run_shard``): worker ``rank`` of ``world`` predicts dialogues ``rank, rank + world,
   ...`` of that list into its own part folder ``DIR/.parts/rank-<k>/``. Several processes are re-launched
   workers (``workers``), on one machine or several.
3. merge (``outputs.finalize``): the parts are merged into ``DIR`` in input order (``predictions.jsonl``
   rewritten atomically, masks moved), ``errors.jsonl`` rewritten, parts removed.

A run killed at any moment leaves complete files only; the next ``--resume`` merges what finished and
predicts the rest. A dialogue that is only partly written counts as not done and is predicted again.
The settings are ``settings.InferenceConfig``; which checkpoint and thresholds, ``checkpoint_policy``;
scoring the written folders, ``mediround.reports.scoring.score_run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mediround.data.predictions import read_predictions
from mediround.error_log import ERRORS_FILE
from mediround.inference.checkpoint_policy import load_model, resolve_betas
from mediround.inference.events import InferenceEvents
from mediround.inference.outputs import dialogues_with_problems, finalize, parts_root
from mediround.inference.plan import load_plan, record_finish
from mediround.inference.settings import InferenceConfig
from mediround.inference.sharding import run_shard, shard_marks
from mediround.inference.workers import launch_workers
from mediround.model.load_report import LoadReport


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


def _counter(on_progress: Callable[[int], None]) -> Callable[[], None]:
    finished = 0

    def advance() -> None:
        nonlocal finished
        finished += 1
        on_progress(finished)

    return advance


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
    parts_root(config).mkdir(parents=True, exist_ok=True)
    load_reports: list[LoadReport] = []
    try:
        # The workers of other machines wait for this machine's in the rendezvous: launch them even with
        # nothing to predict, or those machines would wait until the rendezvous times out.
        if config.world_size > 1 and (plan.todo or config.num_machines > 1):
            launch_workers(config, plan, events)
        elif plan.todo:
            model = model if model is not None else load_model(config)
            load_reports = list(getattr(model, "load_reports", []))
            run_shard(config, plan, model, on_done=_counter(events.progressed))
    except KeyboardInterrupt:
        if config.num_machines == 1:
            # Other machines may still be writing their parts: then --resume merges, not this.
            finalize(config, plan.dialogues, plan.problems)
        raise
    shards = shard_marks(config)
    skipped = finalize(config, plan.dialogues, plan.problems)
    skipped_at_load = dialogues_with_problems(plan.problems)
    manifest = record_finish(config, shards)
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
