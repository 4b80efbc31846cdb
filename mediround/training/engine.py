"""The training engine both stages run on: process setup, the step loop with gradient accumulation,
non-finite steps, checkpoints, resuming, the stop file and signals, validation and events.

A stage is an ``Objective``: what model it trains, which micro-batches it reads, the loss of a step's
micro-batches, how it validates and what model it writes at the end (``stage1``, ``stage2``). Each
optimizer step reads one global batch: ``grad_accum`` micro-batches of ``batch_size`` dialogues on each of
the ``world_size`` processes (``mediround.training.data``); the objective scales each micro-batch's loss by
its share of the global batch, so the weights after a step do not depend on how the batch was split over
processes or accumulation steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from mediround.atomic import write_json
from mediround.data.formats import load_dialogues
from mediround.errors import CheckpointError, DataError, LaunchError, MediRoundError
from mediround.launch import check_world_size, stop_requested
from mediround.model.build import keep_trainable_fp32
from mediround.training import checkpointing
from mediround.training.data import ShardedStream, StreamPosition
from mediround.training.events import (
    BestKept,
    CheckpointSaved,
    Event,
    EventHandler,
    RunEnded,
    RunStarted,
    StepLogged,
    StepSkipped,
    WeightsLoaded,
)
from mediround.training.logging import TrainingLog
from mediround.training.recipe import RUN_FILE, RunRecipe, run_record

MODEL_FOLDER = "model"
TRACKER_PROJECT = "mediround"
"""The project name the trackers of ``log.report_to`` get (TensorBoard writes to ``OUTPUT/mediround/``)."""


class TrainingError(MediRoundError):
    """Training cannot go on (a non-finite loss or gradient, an empty data set)."""


@dataclass
class TrainingResult:
    """What a finished (or interrupted) run of either stage did. ``stopped`` is ``finished`` or
    ``interrupted``; ``model`` is the final MediRound checkpoint (``OUTPUT/model``), written when the run
    finishes; ``first_step``/``last_step`` are the first and last optimizer steps taken (skipped ones aside)."""

    output: Path
    step: int
    total_steps: int
    world_size: int
    stopped: str = "finished"
    checkpoint: Path | None = None
    model: Path | None = None
    skipped_steps: int = 0
    data_problems: int = 0
    first_step: StepLogged | None = None
    last_step: StepLogged | None = None
    validations: list[Event] = field(default_factory=list)


@dataclass
class RunStart:
    """What a run knows before it builds a model: the usable dialogues, the problems of the skipped ones
    (training file first), and the checkpoint it resumes from with that checkpoint's trainer state."""

    train_dialogues: list
    val_dialogues: list
    problems: list
    resume_from: Path | None
    state: dict | None


@dataclass
class MicroBatch:
    """One micro-batch of this process: what the objective computes the loss of, the stream position
    after it, and the ids of its dialogues (named when its loss is not finite)."""

    data: Any
    position: StreamPosition
    dialogue_ids: list[str]


@dataclass
class ModelParts:
    """What an objective builds: the model (its ``load_reports`` listed with ``--allow-partial-load``), the
    module whose trainable parameters are optimised and checkpointed, and the module micro-batches run
    through (wrapped by Accelerate for DDP)."""

    model: Any
    trainable: torch.nn.Module
    forward: torch.nn.Module


class Objective(ABC):
    """What a training stage adds to the engine. ``loss_name`` names the loss in the non-finite error."""

    loss_name = "loss"

    @abstractmethod
    def build(self, engine: TrainingEngine, start: RunStart) -> ModelParts:
        """Build or load the model (the random seed is set just before)."""

    @abstractmethod
    def micro_batches(self, engine: TrainingEngine, start: RunStart,
                      position: StreamPosition) -> Iterator[MicroBatch]:
        """This process's endless micro-batches from ``position`` on (raise bad data before returning)."""

    @abstractmethod
    def accumulate(self, engine: TrainingEngine, micro: list[MicroBatch]) -> tuple[float, dict[str, float], bool]:
        """Forward/backward of one optimizer step's micro-batches through ``engine.wrapped``: the global-batch
        loss, its weighted parts by name, and whether this process met a non-finite loss."""

    @abstractmethod
    def validate(self, engine: TrainingEngine, step: int) -> Event | None:
        """Score the validation dialogues (every process takes part); the event to report, if any."""

    @abstractmethod
    def save_model(self, folder: Path) -> None:
        """Write the trained MediRound checkpoint (main process only)."""

    @abstractmethod
    def best_score(self, event: Event, metric: str, best_of: str) -> float | None:
        """The value of ``metric`` over all rounds of the ``best_of`` track of a validation event (None when
        that track was not scored)."""

    @abstractmethod
    def save_best(self, folder: Path, write_extra: Callable[[Path], None]) -> None:
        """Write the model as it is now, as the MediRound checkpoint ``save_model`` would write at the end,
        without changing what training goes on with; ``write_extra`` adds the record (main process only)."""

    def write_checkpoint_extra(self, folder: Path) -> None:
        """Add files to a checkpoint folder being written (main process only)."""

    def run_started(self, **fields: Any) -> RunStarted:
        """The event that opens the run."""
        return RunStarted(**fields)


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of step ``s`` (0-based): linear warm-up to 1 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def micro_batch_scales(counts: list[float], global_counts: list[float], world_size: int, micro_batches: int,
                       averaging: str) -> list[float]:
    """What each loss component of one micro-batch (a mean over that micro-batch's ``counts`` of tokens or
    masks) is multiplied by before its backward, given that gradients are then averaged over the
    ``world_size`` processes (``train.loss_averaging``): ``weighted``, its share of the ``global_counts`` of
    the step's global batch (times ``world_size``, which the average undoes); ``micro-batch-mean``,
    1 / ``micro_batches`` (this process's accumulation steps), so each micro-batch's mean counts the same,
    as DeepSpeed divides the loss by the accumulation steps and averages gradients over processes."""
    if averaging == "micro-batch-mean":
        return [1.0 / micro_batches] * len(counts)
    return [count * world_size / max(1.0, float(total)) for count, total in zip(counts, global_counts)]


def total_steps(recipe: RunRecipe, num_dialogues: int, world_size: int) -> int:
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


def run_stage(
    objective: Objective,
    recipe: RunRecipe,
    *,
    resume: bool = False,
    cpu: bool = True,
    expected_processes: int = 1,
    on_event: EventHandler | None = None,
    allow_partial_load: bool = False,
    deepspeed_config: str | None = None,
) -> TrainingResult:
    """Train ``objective`` in this process (one of ``expected_processes``); returns on the main process
    and on every other process alike. ``on_event(event)`` is called on the main process only.
    ``allow_partial_load`` builds the model even when a weight file misses or adds keys; a
    ``WeightsLoaded`` event then lists what was left random. ``deepspeed_config`` (a JSON file) runs the
    step under DeepSpeed (ZeRO-2) instead of DDP."""
    if cpu:
        torch.set_num_threads(recipe.train.threads or max(1, (os.cpu_count() or 1) // expected_processes))
    # Accelerate keeps its settings in a process-wide singleton: a second run in the same process (a
    # library caller, the tests) may use another precision. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    mixed_precision = recipe.resolved_mixed_precision(on_gpu=not cpu)
    plugin = None
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=recipe.train.find_unused_parameters)]
    if deepspeed_config is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_settings(deepspeed_config, recipe, mixed_precision))
        if cpu:
            # Accelerate finds no backend for DeepSpeed on CPU and then counts one process in each, so its
            # gather_object sizes its list for one rank and fails; naming gloo makes it count torch.distributed's.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=cpu and plugin is None,
        mixed_precision=mixed_precision,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        log_with=recipe.log.report_to or None,
        project_dir=recipe.output,
    )
    world_size, rank = process_group(accelerator)
    check_world_size(world_size, expected_processes, rank)
    try:
        return TrainingEngine(recipe, objective, accelerator, on_event, allow_partial_load).run(resume)
    finally:
        if plugin is not None or recipe.log.report_to:
            # Closes the trackers' files; without it (and the group destroyed) a DeepSpeed process on CPU
            # aborts at exit (SIGABRT).
            accelerator.end_training()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def flat_scalars(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested plain data as ``section.key`` values a tracker's hyperparameter table takes (lists and None
    as text)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def process_group(accelerator: Accelerator) -> tuple[int, int]:
    """This run's world size and rank, as torch.distributed counts them. Accelerate must count the same:
    its ``gather_object`` (validation) sizes what it gathers by its own count, which under DeepSpeed on CPU
    reads 1 in every process unless ``run_stage`` names the gloo backend."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return accelerator.num_processes, accelerator.process_index
    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if (accelerator.num_processes, accelerator.process_index) != (world_size, rank):
        raise LaunchError(f"process rank {rank} of {world_size}: Accelerate counts it as rank "
                          f"{accelerator.process_index} of {accelerator.num_processes}; refusing to run")
    return world_size, rank


def deepspeed_settings(path: str, recipe: RunRecipe, mixed_precision: str) -> dict:
    """The DeepSpeed config of ``path`` with what the recipe decides filled in (micro-batch, accumulation,
    clipping, bf16/fp16), so that the recipe stays the one description of the run. The optimizer is the
    engine's AdamW (``zero_allow_untested_optimizer``)."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LaunchError(f"--deepspeed {path}: cannot read the DeepSpeed config: {error}") from None
    if not isinstance(settings, dict):
        raise LaunchError(f"--deepspeed {path}: expected a JSON object")
    settings.update({
        "train_micro_batch_size_per_gpu": recipe.train.batch_size,
        "gradient_accumulation_steps": recipe.train.grad_accum,
        "gradient_clipping": recipe.train.clip_grad_norm or 0.0,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
    })
    settings.pop("train_batch_size", None)
    return settings


class TrainingEngine:
    """One process's part of a training run: events, the output folder, resuming, the step loop and
    checkpoint folders. The objective reads ``recipe``, ``accelerator``, ``wrapped`` and ``world_size``."""

    def __init__(self, recipe: RunRecipe, objective: Objective, accelerator: Accelerator,
                 on_event: EventHandler | None, allow_partial_load: bool = False):
        self.recipe = recipe
        self.objective = objective
        self.allow_partial_load = allow_partial_load
        self.accelerator = accelerator
        self.world_size, self.rank = process_group(accelerator)
        self.is_main = self.rank == 0
        self.deepspeed = accelerator.state.deepspeed_plugin is not None
        self.on_event = on_event if self.is_main else None
        self.output = Path(recipe.output)
        self.checkpoints = self.output / "checkpoints"
        self.log: TrainingLog | None = None
        self.report_to = recipe.log.report_to if self.is_main else []

    def emit(self, event: Event) -> None:
        if self.log is not None:
            self.log.write(event)
        if self.report_to and (scalars := event.scalars()):
            self.accelerator.log(scalars, step=event.step)
        if self.on_event is not None:
            self.on_event(event)

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
            check_resumable(state, recipe, self.world_size, resume_from,
                            total_steps(recipe, len(train_dialogues), self.world_size))
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_temporary(self.checkpoints)
            if state is None:
                checkpointing.remove_best(self.checkpoints)
            # Rewritten on resume too: it records the run as it now goes on (a raised train.max_steps).
            write_json(self.output / RUN_FILE, run_record(recipe))
        self.accelerator.wait_for_everyone()
        self.best = self._restored_best() if state is not None and self.is_main else None
        self.log = TrainingLog(self.output, state["step"] if state else None) if self.is_main else None
        if self.report_to:
            self.accelerator.init_trackers(TRACKER_PROJECT, config=flat_scalars(recipe.to_dict()),
                                           init_kwargs={"wandb": {"name": self.output.name, "dir": str(self.output)}})
        return RunStart(train_dialogues, val_dialogues, train_problems + val_problems, resume_from, state)

    def _restored_best(self) -> dict | None:
        """On resume: the record of the best checkpoint so far, when it was chosen by this recipe's metric
        and track (so that a resumed run replaces it only with a better one); None otherwise."""
        if self.recipe.checkpoint.keep_best is None:
            return None
        record = checkpointing.read_best(self.checkpoints)
        wanted = {"metric": self.recipe.checkpoint.keep_best, "best_of": self.recipe.checkpoint.best_of}
        if record is None or any(record.get(key) != value for key, value in wanted.items()):
            return None
        return record

    def stream(self, count: int, position: StreamPosition) -> ShardedStream:
        """This process's share of ``count`` training dialogues, from ``position`` on."""
        recipe = self.recipe
        try:
            return ShardedStream(count, recipe.train.batch_size, self.world_size, self.rank, recipe.train.seed,
                                 position)
        except ValueError as error:
            raise DataError(recipe.data.train, None, None, str(error)) from None

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """The forward/backward of one micro-batch: gradients are synchronised (and, under DeepSpeed, the
        optimizer steps) only after the ``last`` micro-batch of the step."""
        if self.deepspeed:
            self.accelerator.gradient_state._set_sync_gradients(last)
            try:
                yield
            finally:
                self.accelerator.gradient_state._set_sync_gradients(True)
        elif last:
            yield
        else:
            with self.accelerator.no_sync(self.wrapped):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss already scaled by its share of the global batch (DeepSpeed must
        not divide it by the accumulation steps again)."""
        if self.deepspeed:
            self.accelerator.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def any_process(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "sum").item() > 0)

    def run(self, resume: bool) -> TrainingResult:
        recipe = self.recipe
        start = self.begin(resume)
        set_seed(recipe.train.seed)
        parts = self.objective.build(self, start)
        keep_trainable_fp32(parts.trainable)
        if self.allow_partial_load:
            self.emit(WeightsLoaded([asdict(report) for report in parts.model.load_reports]))
        if start.resume_from is not None:
            checkpointing.load_trainable(parts.trainable, start.resume_from)
        self.params = [param for param in parts.trainable.parameters() if param.requires_grad]
        self.trainable = parts.trainable
        optimizer = torch.optim.AdamW(self.params, lr=recipe.train.lr, betas=recipe.train.betas,
                                      eps=recipe.train.eps, weight_decay=recipe.train.weight_decay)
        steps = total_steps(recipe, len(start.train_dialogues), self.world_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(recipe.train.warmup_steps, steps))
        self.wrapped, self.optimizer = self.accelerator.prepare(parts.forward, optimizer)
        self.scheduler = scheduler
        step, position = self._restore(start)
        batches = self.objective.micro_batches(self, start, position)
        self.has_validation = bool(start.val_dialogues)
        self.val_count = len(start.val_dialogues)
        result = TrainingResult(self.output, step, steps, self.world_size, data_problems=len(start.problems))
        self.emit(self.objective.run_started(
            step=step, total_steps=steps, world_size=self.world_size, global_batch=recipe.global_batch(self.world_size),
            recipe_hash=recipe.hash, resumed_from=str(start.resume_from) if start.resume_from else None,
            train_dialogues=len(start.train_dialogues), val_dialogues=len(start.val_dialogues),
            data_problems=[p.one_line() for p in start.problems[:20]],
        ))
        if start.state is None and recipe.validation.at_start and self.has_validation:
            self._validate(result, 0)
        try:
            with stop_on_signals() as stop:
                return self._loop(result, batches, stop, step, steps)
        finally:
            if self.log is not None:
                self.log.close()

    def _restore(self, start: RunStart) -> tuple[int, StreamPosition]:
        """The step and stream position to go on from; optimizer, scheduler and RNG state loaded when resuming."""
        if start.state is None:
            return 0, StreamPosition()
        if self.deepspeed:
            state = checkpointing.load_state(start.resume_from, self._optimizer_file())
            checkpointing.load_zero_optimizer_state(self.optimizer.optimizer, state, self.rank, self.world_size)
        else:
            self.optimizer.load_state_dict(checkpointing.load_state(start.resume_from, "optimizer"))
        self.scheduler.load_state_dict(checkpointing.load_state(start.resume_from, "scheduler"))
        # The LR of a step is a function of the step and of this run's total, which --resume may have raised:
        # the next step's LR comes from the schedule, not from the checkpoint's optimizer state.
        for group, base_lr, factor in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        checkpointing.restore_rng_state(checkpointing.load_state(start.resume_from, f"rng-rank{self.rank}"))
        return start.state["step"], StreamPosition(**start.state["position"])

    def _loop(self, result: TrainingResult, batches: Iterator[MicroBatch], stop: StopFlag, step: int,
              steps: int) -> TrainingResult:
        recipe = self.recipe
        global_batch = recipe.global_batch(self.world_size)
        while step < steps:
            started = time.perf_counter()
            micro = [next(batches) for _ in range(recipe.train.grad_accum)]
            loss, components, nonfinite = self.objective.accumulate(self, micro)
            grad_norm = self._clip_gradients()
            bad = self.any_process(nonfinite or not math.isfinite(grad_norm))
            position = micro[-1].position
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                where = (f"step {step + 1} (epoch {micro[0].position.epoch}, batch {micro[0].position.batch - 1}); "
                         f"dialogues on process {self.rank}: {[i for batch in micro for i in batch.dialogue_ids]}")
                if not recipe.train.skip_nonfinite:
                    raise TrainingError(f"non-finite {self.objective.loss_name} or gradient at {where}; nothing was "
                                        "written for this step (set train.skip_nonfinite: true to skip such steps)")
                result.skipped_steps += 1
                self.emit(StepSkipped(step + 1, "non-finite loss or gradient", where))
            else:
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            step += 1
            if not bad:
                logged = StepLogged(step, loss, components, lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                                    samples_per_s=global_batch / (time.perf_counter() - started),
                                    epoch=position.epoch)
                result.first_step = result.first_step or logged
                result.last_step = logged
                if step % recipe.log.every == 0 or step == 1 or step == steps:
                    self.emit(logged)
            result.step = step
            interrupted = self.any_process(stop.raised or stop_requested())
            every = recipe.validation.every
            if self.has_validation and ((every and step % every == 0) or step == steps):
                self._validate(result, step)
            if (recipe.checkpoint.every and step % recipe.checkpoint.every == 0) or step == steps or interrupted:
                result.checkpoint = self._save(step, position)
            if interrupted:
                result.stopped = "interrupted"
                break
        if result.stopped == "finished":
            result.model = self.output / MODEL_FOLDER
            if self.is_main:
                self.objective.save_model(result.model)
        self.accelerator.wait_for_everyone()
        self.emit(RunEnded(step, result.stopped, str(result.checkpoint) if result.checkpoint else None,
                           str(result.model) if result.model else None, result.skipped_steps))
        return result

    def _optimizer_file(self) -> str:
        """Where the optimizer state goes: one file, or under ZeRO one partition per process."""
        return f"optimizer-rank{self.rank}" if self.deepspeed else "optimizer"

    def _optimizer_state(self) -> dict | None:
        """What this process writes of the optimizer state (None: another process writes it)."""
        if self.deepspeed:
            return checkpointing.zero_optimizer_state(self.optimizer.optimizer)
        return self.optimizer.state_dict() if self.is_main else None

    def _clip_gradients(self) -> float:
        """Clip to ``train.clip_grad_norm`` and return the global gradient norm (before clipping). DeepSpeed
        clips inside its step (``gradient_clipping``) and reports the norm it saw."""
        norm = self.accelerator.clip_grad_norm_(self.params, self.recipe.train.clip_grad_norm or math.inf)
        return float(norm) if norm is not None else 0.0

    def _validate(self, result: TrainingResult, step: int) -> None:
        event = self.objective.validate(self, step)
        if event is not None:
            result.validations.append(event)
            self.emit(event)
        settings = self.recipe.checkpoint
        if settings.keep_best is not None and 0 < step <= (settings.best_until_step or step):
            if self.is_main and event is not None:
                self._keep_if_best(event, step)
            self.accelerator.wait_for_everyone()

    def _keep_if_best(self, event: Event, step: int) -> None:
        """Replace the best checkpoint when this validation beats it (strictly, as the authors compare;
        a NaN never does)."""
        settings = self.recipe.checkpoint
        value = self.objective.best_score(event, settings.keep_best, settings.best_of)
        if value is None or not math.isfinite(value):
            return
        if self.best is not None and not value > self.best["value"]:
            return
        validation = self.recipe.validation
        count = self.val_count
        record = {
            "step": step, "metric": settings.keep_best, "best_of": settings.best_of, "rounds": "all",
            "best_until_step": settings.best_until_step,
            "value": value, "validation_dialogues": count if validation.max_dialogues is None
            else min(count, validation.max_dialogues), "recipe_hash": self.recipe.hash,
        }
        folder = checkpointing.write_best(self.checkpoints, self.objective.save_best, record)
        self.best = record
        self.emit(BestKept(step, settings.keep_best, settings.best_of, value, str(folder)))

    def _save(self, step: int, position: StreamPosition) -> Path:
        """Write a checkpoint under a hidden name, then rename it; every process takes part. The objective
        adds its files to the hidden folder on the main process before the trainer state is written."""
        for parameter in self.params:
            if not torch.isfinite(parameter.detach()).all():
                raise TrainingError(f"refusing to write a checkpoint at step {step}: non-finite weights")
        temporary = checkpointing.temporary_folder(self.checkpoints, step)
        final = self.checkpoints / checkpointing.checkpoint_name(step)
        if self.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        checkpointing.write_checkpoint_files(
            temporary,
            model=self.trainable if self.is_main else None,
            optimizer_state=self._optimizer_state(),
            scheduler_state=self.scheduler.state_dict() if self.is_main else None,
            rank=self.rank,
            optimizer_name=self._optimizer_file(),
        )
        if self.is_main:
            self.objective.write_checkpoint_extra(temporary)
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
            self.emit(CheckpointSaved(step, str(final)))
        self.accelerator.wait_for_everyone()
        return final


def load_training_dialogues(path: str, recipe: RunRecipe) -> tuple[list, list]:
    """The dialogues of a recipe's data file that have every answer and mask, and the problems of those skipped."""
    loaded = load_dialogues(path, root=recipe.data.root, allow_outside_root=recipe.data.allow_outside_root,
                            require_labels=True)
    return loaded.dialogues, loaded.problems


def check_resumable(state: dict, recipe: RunRecipe, world_size: int, folder: Path, steps: int) -> None:
    """Refuse (``CheckpointError``) a checkpoint written by another recipe or another number of processes,
    or one past the run's ``steps``."""
    if state.get("step", 0) > steps:
        raise CheckpointError(f"{folder}: is at step {state.get('step')}, past this run's {steps} steps "
                              "(train.max_steps may be raised on --resume, not lowered below the checkpoint)")
    if state.get("recipe_hash") != recipe.hash:
        raise CheckpointError(f"{folder}: written by recipe {state.get('recipe_hash')}, not this one ({recipe.hash})")
    if state.get("world_size") != world_size:
        raise CheckpointError(
            f"{folder}: written by {state.get('world_size')} process(es); resume it with the same number "
            f"(this run has {world_size})"
        )
