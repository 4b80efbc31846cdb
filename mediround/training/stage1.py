"""Stage 1: MediRound trained with teacher forcing (the ``Objective`` the engine runs for ``mediround train``).

The loss of a step is the loss of its global batch as one batch: token-mean cross-entropy over all its
answer tokens and mask-mean BCE/Dice over all its masks (and the entity loss over its rounds with an entity).
Each micro-batch's components are rescaled by its share of the global token, mask and entity counts; with
``train.loss_averaging: micro-batch-mean`` each micro-batch's means count the same instead (the authors' way).
Validation scores the teacher-forced masks of the training forward and, with ``validation.chained``, the
rounds chained from the model's own masks (``mediround.inference.chain``, what ``mediround eval`` measures).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from mediround.errors import RecipeError
from mediround.inference.chain import Track, chain_dialogue
from mediround.metrics import METRICS, counts
from mediround.model import MediRoundConfig, build_model, load_sample
from mediround.model.checkpoint import load_checkpoint, save_checkpoint
from mediround.model.frame import mask_from_logits
from mediround.model.losses import LOSS_KEYS, weighted_loss
from mediround.model.processor import IGNORE
from mediround.training.data import (
    BatchLoader,
    DialogueDataset,
    ShardedStream,
    StreamPosition,
    validation_shard,
)
from mediround.training.engine import (
    MODEL_FOLDER,
    MicroBatch,
    ModelParts,
    Objective,
    RunStart,
    TrainingEngine,
    TrainingResult,
    micro_batch_scales,
    run_stage,
)
from mediround.training.events import (
    CHAINED_TRACK,
    TEACHER_FORCED_TRACK,
    Event,
    EventHandler,
    TrackScores,
    Validated,
)
from mediround.training.logging import ValidationLog, score_rows
from mediround.training.recipe import Recipe
from mediround.training.reference_swaps import ReferenceSwaps


def run_training(recipe: Recipe, *, resume: bool = False, cpu: bool = True, expected_processes: int = 1,
                 on_event: EventHandler | None = None, allow_partial_load: bool = False,
                     deepspeed_config: str | None = None) -> TrainingResult:
    """Train one stage-1 run in this process (``engine.run_stage`` says how)."""
    return run_stage(TeacherForcing(recipe), recipe, resume=resume, cpu=cpu, expected_processes=expected_processes,
                     on_event=on_event, allow_partial_load=allow_partial_load, deepspeed_config=deepspeed_config)


class TeacherForcing(Objective):
    """Stage 1's objective: every trainable part of MediRound on teacher-forced dialogues."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def build(self, engine: TrainingEngine, start: RunStart) -> ModelParts:
        """The recipe's model: freshly built, or with the weights of the ``init_from`` checkpoint (on resume
        too: its frozen weights are not in the training checkpoint)."""
        config = with_entity_names(self.recipe.model, start.train_dialogues)
        if self.recipe.init_from is None:
            self.model = build_model(config, allow_partial=engine.allow_partial_load)
        else:
            self.model = load_checkpoint(self.recipe.init_from, allow_partial=engine.allow_partial_load, config=config)
        self.model.train()
        self.val_dialogues = start.val_dialogues
        self.val_log = (ValidationLog(engine.output, start.state["step"] if start.state else None)
                        if engine.is_main else None)
        return ModelParts(self.model, self.model, self.model)

    def micro_batches(self, engine: TrainingEngine, start: RunStart,
                      position: StreamPosition) -> Iterator[MicroBatch]:
        swap = self.recipe.augment.reference_swap
        dataset = DialogueDataset(start.train_dialogues, load_sample,
                                  ReferenceSwaps(swap, self.recipe.train.seed) if swap > 0 else None)
        stream = engine.stream(len(dataset), position)
        loader = BatchLoader(dataset, self.model.processor.collate, self.recipe.train.num_workers)
        return _micro_batches(stream, loader, dataset)

    def accumulate(self, engine: TrainingEngine, micro: list[MicroBatch]) -> tuple[float, dict[str, float], bool]:
        accelerator, world_size = engine.accelerator, engine.world_size
        local_counts = torch.tensor([_loss_counts(batch.data) for batch in micro], dtype=torch.float64).sum(0)
        global_counts = accelerator.reduce(local_counts.to(accelerator.device), "sum").cpu()
        report = torch.zeros(1 + len(LOSS_KEYS), dtype=torch.float64)
        nonfinite = False
        for index, batch in enumerate(micro):
            shares = micro_batch_scales(_loss_counts(batch.data), global_counts.tolist(), world_size, len(micro),
                                        self.recipe.train.loss_averaging)
            with engine.accumulating(last=index == len(micro) - 1):
                with accelerator.autocast():
                    output = engine.wrapped(batch.data)
                parts = {key: output.losses[key] * share for key, share in zip(LOSS_KEYS, shares)}
                loss = weighted_loss(self.recipe.model.loss, parts)
                if not torch.isfinite(loss.detach()):
                    nonfinite = True
                engine.backward(loss)
            report += torch.tensor([float(loss.detach()), *(float(p.detach()) for p in parts.values())],
                                   dtype=torch.float64)
        total = [float(v) for v in accelerator.reduce(report.to(accelerator.device), "sum").cpu() / world_size]
        return total[0], dict(zip(LOSS_KEYS, total[1:])), nonfinite

    @torch.no_grad()
    def validate(self, engine: TrainingEngine, step: int) -> Validated | None:
        """Score this process's validation shard with ``mediround.metrics``: the teacher-forced masks of the
        training forward, and (``validation.chained``) the masks of rounds chained from the model's own
        earlier masks. The main process writes the per-round summaries to ``validation.parquet`` and
        returns the event."""
        model, settings = self.model, self.recipe.validation
        model.eval()
        indices = validation_shard(len(self.val_dialogues), engine.world_size, engine.rank, settings.max_dialogues)
        rows: dict[str, list] = {TEACHER_FORCED_TRACK: [], CHAINED_TRACK: []}
        losses = []
        for start in range(0, len(indices), settings.batch_size):
            samples = [load_sample(self.val_dialogues[i]) for i in indices[start : start + settings.batch_size]]
            with engine.accelerator.autocast():
                batch = model.processor.collate(samples)
                output = model(batch)
                losses.append(float(output.loss))
                for sample, frame, logits in zip(samples, batch.frames, output.mask_logits):
                    masks = mask_from_logits(frame.to_original(logits))
                    rows[TEACHER_FORCED_TRACK].extend(_mask_rows(sample, masks))
                    if settings.chained:
                        rows[CHAINED_TRACK].extend(_mask_rows(sample, _chained_masks(model, sample)))
        model.train()
        gathered = {track: gather_object(track_rows) for track, track_rows in rows.items()}
        losses = gather_object(losses)
        if not engine.is_main or not gathered[TEACHER_FORCED_TRACK]:
            return None
        tracks = {}
        for track, track_rows in gathered.items():
            if not track_rows:
                continue
            table = score_rows(step, track_rows, track)
            self.val_log.add(table)
            overall = table[0]
            tracks[track] = TrackScores(**{metric: overall[metric] for metric in METRICS},
                                        rounds={r["round"]: r["dice"] for r in table if r["split"] == "round"})
        return Validated(step, tracks, loss=float(np.mean(losses)), masks=len(gathered[TEACHER_FORCED_TRACK]))

    def best_score(self, event: Event, metric: str, best_of: str) -> float | None:
        scores = event.tracks.get(best_of) if isinstance(event, Validated) else None
        return None if scores is None else getattr(scores, metric)

    def save_best(self, folder: Path, write_extra: Callable[[Path], None]) -> None:
        save_checkpoint(self.model, folder, write_extra)

    def write_checkpoint_extra(self, folder: Path) -> None:
        """``model/``: a MediRound checkpoint that infer, eval and train-jcm load."""
        save_checkpoint(self.model, folder / MODEL_FOLDER)

    def save_model(self, folder: Path) -> None:
        save_checkpoint(self.model, folder)


def with_entity_names(config: MediRoundConfig, dialogues: list) -> MediRoundConfig:
    """``config`` with ``heads.entity_names`` filled (sorted) from the training rounds' ``entity`` fields
    when the entity loss is on and the recipe names none; a copy, so the recipe and its hash stay as written."""
    if not config.loss.entity or config.heads.entity_names:
        return config
    names = sorted({round_.entity for dialogue in dialogues for round_ in dialogue.rounds if round_.entity})
    if not names:
        raise RecipeError("recipe: field 'model.loss.entity': is > 0 but no training round has an 'entity'")
    filled = copy.deepcopy(config)
    filled.heads.entity_names = names
    return filled


def _micro_batches(stream: ShardedStream, loader: BatchLoader, dataset: DialogueDataset,
                   chunk: int = 64) -> Iterator[MicroBatch]:
    """Endless micro-batches of this process, collated ``chunk`` at a time (prefetched by the loader's workers)."""
    while True:
        index_batches, positions = [], []
        for _ in range(chunk):
            indices = stream.next_indices()
            # The stream's position is already past this batch, in the epoch the batch was read from.
            index_batches.append([(stream.position.epoch, index) for index in indices])
            positions.append(stream.position)
        for keys, batch, position in zip(index_batches, loader.iterate(index_batches), positions):
            yield MicroBatch(batch, position, [dataset.dialogues[index].id for _, index in keys])


def _loss_counts(batch: Any) -> list[float]:
    """What each loss of ``LOSS_KEYS`` averages over in this batch: answer tokens (CE), supervised masks
    (BCE, Dice) and rounds with a known entity (entity loss)."""
    tokens = float((batch.labels[:, 1:] != IGNORE).sum())
    masks = float(sum(int(valid.sum()) for valid in batch.target_valid))
    entities = float(sum(int((labels != IGNORE).sum()) for labels in batch.entity_labels))
    counts = {"ce": tokens, "bce": masks, "dice": masks, "entity": entities}
    return [counts[key] for key in LOSS_KEYS]


def _chained_masks(model: Any, sample: Any) -> list[np.ndarray]:
    """Masks of every round chained from the model's own earlier masks (Algorithm 1, JCM off)."""
    track = Track(beta=None, teacher_forcing=False)
    predictions = chain_dialogue(model, sample.dialogue, sample.image, [track])[track]
    return [prediction.mask for prediction in predictions]


def _mask_rows(sample: Any, masks: Any) -> list[dict]:
    """Metric rows of one dialogue: each round's predicted mask (image size) against its ground truth."""
    rows = []
    for index, (round_, truth) in enumerate(zip(sample.dialogue.rounds, sample.masks)):
        if truth is None:
            continue
        scored = counts(np.asarray(masks[index], dtype=bool)[None], np.asarray(truth, dtype=bool)[None])
        rows.append({
            "dialogue_id": sample.dialogue.id,
            "round": index + 1,
            "names_target": round_.names_target,
            **{key: scored[key][0].item() for key in ("intersection", "union", "pred_area", "gt_area", "iou", "dice")},
        })
    return rows
