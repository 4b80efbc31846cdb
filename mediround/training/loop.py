"""Stage-1 training (teacher forcing) of MediRound in one or many processes.

Each optimizer step reads one global batch: ``grad_accum`` micro-batches of ``batch_size`` dialogues on
each of the ``world_size`` processes (``mediround.training.data``). The loss of the step is the loss of
that global batch as one batch: token-mean cross-entropy over all its answer tokens and mask-mean
BCE/Dice over all its masks. Each micro-batch's components are rescaled by its share of the global
token and mask counts, so the weights after a step do not depend on how the batch was split over
processes or accumulation steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mediround.atomic import write_json
from mediround.errors import CheckpointError, DataError, MediRoundError, RecipeError
from mediround.model.config import MediRoundConfig
from mediround.training import checkpointing
from mediround.training.data import (
    BatchLoader,
    DialogueDataset,
    ShardedStream,
    StreamPosition,
    validation_shard,
)
from mediround.launch import check_world_size, stop_requested
from mediround.training.logging import CHAINED, TEACHER_FORCED, TrainingLog, ValidationLog, score_rows
from mediround.training.recipe import RUN_FILE, Recipe, run_record

EventHandler = Callable[[str, dict], None]
LOSS_KEYS = ("ce", "bce", "dice", "entity")
MODEL_FOLDER = "model"


class TrainingError(MediRoundError):
    """Training cannot go on (a non-finite loss or gradient, an empty data set)."""


@dataclass
class TrainingResult:
    """What a finished (or interrupted) run did. ``stopped`` is ``finished`` or ``interrupted``; ``model`` is
    the final MediRound checkpoint (``OUTPUT/model``), written when the run finishes."""

    output: Path
    step: int
    total_steps: int
    world_size: int
    stopped: str
    checkpoint: Path | None
    model: Path | None = None
    skipped_steps: int = 0
    data_problems: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    validations: list[dict] = field(default_factory=list)


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of step ``s`` (0-based): linear warm-up to 1 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def total_steps(recipe: Recipe, num_dialogues: int, world_size: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``train.epochs`` over the data."""
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    per_epoch = num_dialogues // (recipe.train.batch_size * world_size)
    return max(1, recipe.train.epochs * per_epoch // recipe.train.grad_accum)


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM during training: checkpoint at the end of the current step, then stop."""

    raised: bool = False


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """A ``StopFlag`` raised by SIGINT/SIGTERM while the block runs; the previous handlers come back after."""
    flag = StopFlag()

    def handle(signum: int, frame: Any) -> None:
        flag.raised = True

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_training(
    recipe: Recipe,
    *,
    resume: bool = False,
    cpu: bool = True,
    expected_processes: int = 1,
    on_event: EventHandler | None = None,
    allow_partial_load: bool = False,
) -> TrainingResult:
    """Train one stage-1 run in this process (one of ``expected_processes``); returns on the main process
    and on every other process alike. ``on_event(kind, payload)`` is called on the main process only.
    ``allow_partial_load`` builds the model even when a base weight file misses or adds keys; a ``load``
    event then lists what was left random."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu:
        torch.set_num_threads(recipe.train.threads or max(1, (os.cpu_count() or 1) // expected_processes))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.resolved_mixed_precision(on_gpu=not cpu),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.train.find_unused_parameters)],
    )
    check_world_size(accelerator.num_processes, expected_processes, accelerator.process_index)
    trainer = _Trainer(recipe, accelerator, on_event, allow_partial_load)
    return trainer.run(resume)


@dataclass
class RunStart:
    """What a run knows before it builds a model: the usable dialogues, the problems of the skipped ones
    (training file first), and the checkpoint it resumes from with that checkpoint's trainer state."""

    train_dialogues: list
    val_dialogues: list
    problems: list
    resume_from: Path | None
    state: dict | None


class TrainingProcess:
    """One process's part of a training run, common to stage 1 and stage 2: events, the output folder,
    resuming, the sharded data stream and checkpoint folders. ``recipe`` is a ``Recipe`` or a ``JCMRecipe``;
    a subclass sets ``optimizer`` and ``scheduler`` before it writes a checkpoint."""

    def __init__(self, recipe: Any, accelerator: Any, on_event: EventHandler | None,
                 allow_partial_load: bool = False):
        self.recipe = recipe
        self.allow_partial_load = allow_partial_load
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.on_event = on_event if self.is_main else None
        self.output = Path(recipe.output)
        self.checkpoints = self.output / "checkpoints"
        self.log: TrainingLog | None = None

    def emit(self, kind: str, **payload: Any) -> None:
        if self.log is not None:
            self.log.write(kind, **payload)
        if self.on_event is not None:
            self.on_event(kind, payload)

    def begin(self, resume: bool) -> RunStart:
        """Load the dialogues, find the checkpoint to resume from (checked against this run), prepare the
        output folder and open the training log."""
        recipe = self.recipe
        train_dialogues, train_problems = load_training_dialogues(recipe.data.train, recipe)
        val_dialogues, val_problems = (load_training_dialogues(recipe.data.val, recipe) if recipe.data.val
                                       else ([], []))
        if not train_dialogues:
            raise DataError(recipe.data.train, None, None, "no usable training dialogue")
        resume_from = checkpointing.latest_checkpoint(self.checkpoints) if resume else None
        state = checkpointing.read_trainer_state(resume_from) if resume_from else None
        if state is not None:
            check_resumable(state, recipe, self.world_size, resume_from)
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_temporary(self.checkpoints)
            if state is None or not (self.output / RUN_FILE).exists():
                write_json(self.output / RUN_FILE, run_record(recipe))
        self.accelerator.wait_for_everyone()
        self.log = TrainingLog(self.output, state["step"] if state else None) if self.is_main else None
        return RunStart(train_dialogues, val_dialogues, train_problems + val_problems, resume_from, state)

    def restore(self, start: RunStart, optimizer: Any, scheduler: Any) -> tuple[int, StreamPosition]:
        """The step and stream position to go on from; optimizer, scheduler and RNG state loaded when resuming."""
        if start.state is None:
            return 0, StreamPosition()
        optimizer.load_state_dict(checkpointing.load_state(start.resume_from, "optimizer"))
        scheduler.load_state_dict(checkpointing.load_state(start.resume_from, "scheduler"))
        checkpointing.restore_rng_state(checkpointing.load_state(start.resume_from, f"rng-rank{self.rank}"))
        return start.state["step"], StreamPosition(**start.state["position"])

    def stream(self, count: int, position: StreamPosition) -> ShardedStream:
        """This process's share of ``count`` training dialogues, from ``position`` on."""
        recipe = self.recipe
        try:
            return ShardedStream(count, recipe.train.batch_size, self.world_size, self.rank, recipe.train.seed,
                                 position)
        except ValueError as error:
            raise DataError(recipe.data.train, None, None, str(error)) from None

    def run_loop(self, loop: Callable[[StopFlag], Any]) -> Any:
        """``loop(stop)`` with SIGINT/SIGTERM caught into ``stop``; the training log is closed after."""
        try:
            with stop_on_signals() as stop:
                return loop(stop)
        finally:
            if self.log is not None:
                self.log.close()

    def any_process(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "sum").item() > 0)

    def write_checkpoint(self, step: int, position: StreamPosition, trainable: torch.nn.Module,
                         write_extra: Callable[[Path], Any] | None = None) -> Path:
        """Write a checkpoint under a hidden name, then rename it; every process takes part. ``write_extra``
        adds files to the hidden folder on the main process before the trainer state is written."""
        temporary = checkpointing.temporary_folder(self.checkpoints, step)
        final = self.checkpoints / checkpointing.checkpoint_name(step)
        if self.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        checkpointing.write_checkpoint_files(
            temporary,
            model=trainable if self.is_main else None,
            optimizer_state=self.optimizer.state_dict() if self.is_main else None,
            scheduler_state=self.scheduler.state_dict() if self.is_main else None,
            rank=self.rank,
        )
        if self.is_main and write_extra is not None:
            write_extra(temporary)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            checkpointing.write_trainer_state(temporary, {
                "step": step,
                "position": {"epoch": position.epoch, "batch": position.batch},
                "world_size": self.world_size,
                "recipe_hash": self.recipe.hash,
                "global_batch": self.recipe.global_batch(self.world_size),
            })
            checkpointing.publish(temporary, final)
            checkpointing.prune(self.checkpoints, self.recipe.checkpoint.keep_last)
            self.emit("checkpoint", step=step, path=str(final))
        self.accelerator.wait_for_everyone()
        return final


class _Trainer(TrainingProcess):
    def __init__(self, recipe: Recipe, accelerator: Any, on_event: EventHandler | None,
                 allow_partial_load: bool = False):
        super().__init__(recipe, accelerator, on_event, allow_partial_load)
        self.val_log: ValidationLog | None = None

    def run(self, resume: bool) -> TrainingResult:
        from accelerate.utils import set_seed

        from mediround.model import build_model, load_sample

        recipe = self.recipe
        start = self.begin(resume)
        train_dialogues, val_dialogues, resume_from, state = (start.train_dialogues, start.val_dialogues,
                                                              start.resume_from, start.state)
        self.val_log = ValidationLog(self.output, state["step"] if state else None) if self.is_main else None

        set_seed(recipe.train.seed)
        model = build_model(with_entity_names(recipe.model, train_dialogues), allow_partial=self.allow_partial_load)
        if self.allow_partial_load:
            self.emit("load", reports=[asdict(report) for report in model.load_reports])
        model.train()
        if resume_from is not None:
            checkpointing.load_trainable(model, resume_from)
        params = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=recipe.train.lr, betas=recipe.train.betas, eps=recipe.train.eps,
            weight_decay=recipe.train.weight_decay,
        )
        steps = total_steps(recipe, len(train_dialogues), self.world_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(recipe.train.warmup_steps, steps))
        wrapped, optimizer = self.accelerator.prepare(model, optimizer)
        self.model, self.wrapped, self.optimizer, self.scheduler, self.params = model, wrapped, optimizer, scheduler, params
        step, position = self.restore(start, optimizer, scheduler)

        dataset = DialogueDataset(train_dialogues, load_sample)
        self.val_dialogues = val_dialogues
        stream = self.stream(len(dataset), position)
        loader = BatchLoader(dataset, model.collate, recipe.train.num_workers)
        batches = _micro_batches(stream, loader, dataset)
        result = TrainingResult(self.output, step, steps, self.world_size, "finished", None,
                                data_problems=len(start.problems))
        self.emit(
            "start", step=step, total_steps=steps, world_size=self.world_size,
            global_batch=recipe.global_batch(self.world_size), recipe_hash=recipe.hash,
            resumed_from=str(resume_from) if resume_from else None,
            train_dialogues=len(train_dialogues), val_dialogues=len(val_dialogues),
            data_problems=[p.one_line() for p in start.problems[:20]],
        )
        if state is None and recipe.validation.at_start and val_dialogues:
            result.validations.append(self.validate(0))
        return self.run_loop(lambda stop: self._loop(result, batches, stop, step, steps))

    def _loop(self, result: TrainingResult, batches: Iterator, stop: StopFlag, step: int, steps: int) -> TrainingResult:
        recipe = self.recipe
        global_batch = recipe.global_batch(self.world_size)
        while step < steps:
            started = time.perf_counter()
            micro = [next(batches) for _ in range(recipe.train.grad_accum)]
            report, nonfinite = self._accumulate(micro)
            grad_norm = self.accelerator.clip_grad_norm_(self.params, recipe.train.clip_grad_norm or math.inf)
            grad_norm = float(grad_norm)
            bad = self.any_process(nonfinite or not math.isfinite(grad_norm))
            position = micro[-1][1]
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                where = (f"step {step + 1} (epoch {micro[0][1].epoch}, batch {micro[0][1].batch - 1}); dialogues on "
                         f"process {self.rank}: {[i for _, _, ids in micro for i in ids]}")
                if not recipe.train.skip_nonfinite:
                    raise TrainingError(f"non-finite loss or gradient at {where}; nothing was written for this "
                                        "step (set train.skip_nonfinite: true to skip such steps)")
                result.skipped_steps += 1
                self.emit("skip", step=step + 1, reason="non-finite loss or gradient", where=where)
            else:
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            if not bad:
                loss = report[0]
                result.first_loss = loss if result.first_loss is None else result.first_loss
                result.last_loss = loss
                if step % recipe.log.every == 0 or step == 1 or step == steps:
                    self.emit(
                        "step", step=step, loss=loss, **dict(zip(LOSS_KEYS, report[1:])),
                        lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                        samples_per_s=global_batch / elapsed, epoch=position.epoch,
                    )
            result.step = step
            self.position = position
            interrupted = self.any_process(stop.raised or stop_requested())
            last = step == steps or interrupted
            every = recipe.validation.every
            if self.val_dialogues and ((every and step % every == 0) or step == steps):
                result.validations.append(self.validate(step))
            if (recipe.checkpoint.every and step % recipe.checkpoint.every == 0) or last:
                result.checkpoint = self.save(step, position)
            if interrupted:
                result.stopped = "interrupted"
                break
        if result.stopped == "finished" and self.is_main:
            from mediround.model.checkpoint import save_checkpoint

            result.model = save_checkpoint(self.model, self.output / MODEL_FOLDER)
        self.accelerator.wait_for_everyone()
        self.emit("end", step=step, model=str(result.model) if result.model else None, stopped=result.stopped, skipped_steps=result.skipped_steps,
                  checkpoint=str(result.checkpoint) if result.checkpoint else None)
        return result

    def _accumulate(self, micro: list) -> tuple[list[float], bool]:
        """Forward/backward of one optimizer step's micro-batches; returns the global-batch loss and its
        components (as one batch) and whether this process met a non-finite loss."""
        local_counts = torch.tensor([_loss_counts(batch) for batch, _, _ in micro], dtype=torch.float64).sum(0)
        global_counts = self.accelerator.reduce(local_counts.to(self.accelerator.device), "sum").cpu()
        weights = self.recipe.model.loss
        report = torch.zeros(1 + len(LOSS_KEYS), dtype=torch.float64)
        nonfinite = False
        for index, (batch, _, _) in enumerate(micro):
            tokens, masks, entities = _loss_counts(batch)
            scale_tokens = tokens * self.world_size / max(1.0, float(global_counts[0]))
            scale_masks = masks * self.world_size / max(1.0, float(global_counts[1]))
            scale_entities = entities * self.world_size / max(1.0, float(global_counts[2]))
            syncing = index == len(micro) - 1
            context = contextlib.nullcontext() if syncing else self.accelerator.no_sync(self.wrapped)
            with context:
                with self.accelerator.autocast():
                    output = self.wrapped(batch)
                parts = [output.losses["ce"] * scale_tokens, output.losses["bce"] * scale_masks,
                         output.losses["dice"] * scale_masks, output.losses["entity"] * scale_entities]
                loss = (weights.ce * parts[0] + weights.bce * parts[1] + weights.dice * parts[2]
                        + weights.entity * parts[3])
                if not torch.isfinite(loss.detach()):
                    nonfinite = True
                self.accelerator.backward(loss)
            report += torch.tensor([float(loss.detach()), *(float(p.detach()) for p in parts)], dtype=torch.float64)
        total = self.accelerator.reduce(report.to(self.accelerator.device), "sum").cpu() / self.world_size
        return [float(v) for v in total], nonfinite

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Score this process's validation shard with ``mediround.metrics``: the teacher-forced masks of the
        training forward, and (``validation.chained``) the masks of rounds chained from the model's own
        earlier masks by ``mediround.inference.chain``, as ``mediround eval`` measures them. The main
        process writes the per-round summaries to ``validation.parquet``."""
        from accelerate.utils import gather_object

        from mediround.metrics import counts
        from mediround.model import MASK_THRESHOLD, load_sample

        model = self.model
        model.eval()
        indices = validation_shard(len(self.val_dialogues), self.world_size, self.rank,
                                   self.recipe.validation.max_dialogues)
        size = self.recipe.validation.batch_size
        rows: dict[str, list] = {TEACHER_FORCED: [], CHAINED: []}
        losses = []
        for start in range(0, len(indices), size):
            samples = [load_sample(self.val_dialogues[i]) for i in indices[start : start + size]]
            with self.accelerator.autocast():
                output = model(model.collate(samples))
                losses.append(float(output.loss))
                for sample, logits in zip(samples, output.mask_logits):
                    masks = _logits_to_masks(logits, sample.image.shape[:2], MASK_THRESHOLD)
                    rows[TEACHER_FORCED].extend(_mask_rows(sample, masks, counts))
                    if self.recipe.validation.chained:
                        rows[CHAINED].extend(_mask_rows(sample, _chained_masks(model, sample), counts))
        model.train()
        gathered = {track: gather_object(track_rows) for track, track_rows in rows.items()}
        losses = gather_object(losses)
        summary: dict = {"step": step}
        if self.is_main and gathered[TEACHER_FORCED]:
            for track, track_rows in gathered.items():
                if not track_rows:
                    continue
                table = score_rows(step, track_rows, track)
                self.val_log.add(table)
                prefix = "" if track == TEACHER_FORCED else f"{track}_"
                overall = table[0]
                summary.update({f"{prefix}dice": overall["dice"], f"{prefix}giou": overall["giou"],
                                f"{prefix}ciou": overall["ciou"],
                                f"{prefix}rounds": {r["round"]: r["dice"] for r in table if r["split"] == "round"}})
            summary.update(loss=float(np.mean(losses)), masks=len(gathered[TEACHER_FORCED]))
            self.emit("validation", **summary)
        return summary

    def save(self, step: int, position: StreamPosition) -> Path:
        """Write a checkpoint under a hidden name, then rename it; every process takes part. Besides the
        training state it holds ``model/``, a MediRound checkpoint that infer, eval and train-jcm load."""
        from mediround.model.checkpoint import save_checkpoint

        for parameter in self.params:
            if not torch.isfinite(parameter.detach()).all():
                raise TrainingError(f"refusing to write a checkpoint at step {step}: non-finite weights")
        return self.write_checkpoint(step, position, self.model,
                                     lambda folder: save_checkpoint(self.model, folder / MODEL_FOLDER))


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
                   chunk: int = 64) -> Iterator[tuple[Any, StreamPosition, list[str]]]:
    """Endless (batch, stream position after it, dialogue ids) triples of this process."""
    while True:
        index_batches, positions = [], []
        for _ in range(chunk):
            index_batches.append(stream.next_indices())
            positions.append(stream.position)
        for indices, batch, position in zip(index_batches, loader.iterate(index_batches), positions):
            yield batch, position, [dataset.dialogues[i].id for i in indices]


def _loss_counts(batch: Any) -> tuple[float, float, float]:
    """What the model's loss averages over in this batch: answer tokens (CE), supervised masks (BCE, Dice)
    and rounds with a known entity (entity loss)."""
    from mediround.model.inputs import IGNORE

    tokens = float((batch.labels[:, 1:] != IGNORE).sum())
    masks = float(sum(int(valid.sum()) for valid in batch.target_valid))
    entities = float(sum(int((labels != IGNORE).sum()) for labels in batch.entity_labels))
    return tokens, masks, entities


def _logits_to_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> np.ndarray:
    """(rounds, h, w) teacher-forced logits at the supervision size -> (rounds, H, W) bool masks of the image."""
    full = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return (full > threshold).cpu().numpy()


def _chained_masks(model: Any, sample: Any) -> list[np.ndarray]:
    """Masks of every round chained from the model's own earlier masks (Algorithm 1, JCM off)."""
    from mediround.inference.chain import Track, chain_dialogue

    track = Track(beta=None, teacher_forcing=False)
    predictions = chain_dialogue(model, sample.dialogue, sample.image, [track])[track]
    return [prediction.mask for prediction in predictions]


def _mask_rows(sample: Any, masks: Any, counts: Callable) -> list[dict]:
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


def load_training_dialogues(path: str, recipe: Any) -> tuple[list, list]:
    """The dialogues of a recipe's data file that have every mask, and the problems of those skipped."""
    from mediround.data.formats import load_dialogues

    loaded = load_dialogues(path, root=recipe.data.root, allow_outside_root=recipe.data.allow_outside_root,
                            require_masks=True)
    return loaded.dialogues, loaded.problems


def check_resumable(state: dict, recipe: Any, world_size: int, folder: Path) -> None:
    """Refuse (``CheckpointError``) a checkpoint written by another recipe or another number of processes."""
    if state.get("recipe_hash") != recipe.hash:
        raise CheckpointError(f"{folder}: written by recipe {state.get('recipe_hash')}, not this one ({recipe.hash})")
    if state.get("world_size") != world_size:
        raise CheckpointError(
            f"{folder}: written by {state.get('world_size')} process(es); resume it with the same number "
            f"(this run has {world_size})"
        )
