"""The second phase of a run: worker ``rank`` of ``world`` predicts dialogues ``rank, rank + world, ...``
of the plan into its own part folder ``DIR/.parts/rank-<k>/`` and marks its shard complete.

Lines are appended and fsynced one by one and masks written atomically, so a kill leaves whole files;
they are written in finishing order on a background thread while the model goes on
(``overlap.WriteBehind``), and a failed write stops the run with its own error, as before;
``progress.jsonl`` has one line per finished dialogue (what a parent process polls for progress).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from typing import Any

from mediround.atomic import append_jsonl_line, write_json
from mediround.data.predictions import PredictionWriter
from mediround.error_log import ERRORS_FILE
from mediround.inference.chain import ChainOutcome
from mediround.inference.outputs import error_record, part_folder, part_root, parts_root, write_overlays
from mediround.inference.overlap import WriteBehind
from mediround.inference.plan import Plan
from mediround.inference.prediction import predict_dialogues
from mediround.inference.settings import InferenceConfig

PROGRESS_FILE = "progress.jsonl"
SHARD_DONE_FILE = "done.json"


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
    part = part_root(config, rank)
    dialogues = [plan.dialogues[index] for index in plan.todo[rank::world]]
    writers = {track: PredictionWriter(part_folder(config, part, track)) for track in config.tracks}
    try:
        with open(part / ERRORS_FILE, "a", encoding="utf-8") as errors, \
                open(part / PROGRESS_FILE, "a", encoding="utf-8") as progress:

            def write(outcome: ChainOutcome) -> None:
                dialogue, error = outcome.dialogue, outcome.error
                if error is not None:
                    append_jsonl_line(errors, error_record(error.file, error.item, dialogue.id, error.field, error.reason))
                else:
                    for track, rounds in outcome.results.items():
                        for prediction in rounds:
                            writers[track].write(dialogue.id, prediction.round, prediction.mask,
                                                 **prediction.record_fields())
                    if config.overlays:
                        write_overlays(config, dialogue, outcome.image, outcome.results)
                append_jsonl_line(progress, {"id": dialogue.id})
                if on_done is not None:
                    on_done()

            with closing(predict_dialogues(model, dialogues, config)) as outcomes, \
                    WriteBehind(write, depth=config.batch_size) as behind:
                for outcome in outcomes:
                    behind.put(outcome)
    finally:
        for writer in writers.values():
            writer.close()
    write_json(part / SHARD_DONE_FILE, {"rank": rank, "world_size": world, "machine_rank": machine_rank,
                                        "dialogues": len(dialogues)})


def shard_marks(config: InferenceConfig) -> list[dict]:
    """The completion marks of the shards in the part folders, by rank."""
    marks = [json.loads(path.read_text(encoding="utf-8")) for path in parts_root(config).glob(f"rank-*/{SHARD_DONE_FILE}")]
    return sorted(marks, key=lambda mark: mark["rank"])


def missing_shards(config: InferenceConfig, world: int) -> list[int]:
    """The ranks of ``world`` whose part folder has no completion mark."""
    return [rank for rank in range(world) if not (part_root(config, rank) / SHARD_DONE_FILE).exists()]
