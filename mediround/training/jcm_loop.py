"""Stage 2: train the Judgment & Correction Mechanism on a frozen MediRound.

Everything of MediRound is frozen and the text loss is off. For each [SEG] feature ``h`` of a round with a
ground-truth mask ``G``:

- judge: binary cross-entropy of ``judge(h)`` towards the soft target ``IoU(decode(h) > 0, G)``, x2;
- refine: ``decode(refine(h))`` through the frozen mask decoder, BCE x2 + Dice x0.5 against ``G``;

each a sum over masks divided by the number of masks of the global batch (as stage 1 does, so the step
does not depend on how the batch is split over processes). Features come from ``jcm_data`` (computed
once per dialogue and cached) and are teacher-forced or, with ``jcm.rollout``, produced by chaining the
model's own masks. The run reuses stage 1's recipe sections, launch, sharded data stream and checkpoint
files; its result is a new MediRound checkpoint (``<output>/model``) whose config says JCM is trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mediround.errors import RecipeError
from mediround.training import checkpointing
from mediround.training.data import ShardedStream, StreamPosition, validation_shard
from mediround.training.jcm_data import (
    ROLLOUT,
    TEACHER_FORCED,
    DialogueFeatures,
    FeatureCache,
    collect_features,
    decode_at_supervision_size,
    rollout_sources,
    spearman,
)
from mediround.launch import check_world_size
from mediround.training.loop import (
    StopFlag,
    TrainingError,
    TrainingProcess,
    total_steps,
    warmup_linear_decay,
)
from mediround.training.recipe import (
    MIXED_PRECISION,
    CheckpointSection,
    DataSection,
    LogSection,
    TrainingSettings,
    TrainSection,
    build_dataclass,
    plain_data,
    read_recipe_file,
)

EventHandler = Callable[[str, dict], None]
MODEL_FOLDER = "model"
LOSS_KEYS = ("judge", "refine_bce", "refine_dice")


@dataclass
class JCMSection:
    """Stage-2 settings: loss weights (the paper's), the feature source, the validation threshold."""

    judge_weight: float = 2.0
    refine_bce_weight: float = 2.0
    refine_dice_weight: float = 0.5
    rollout: bool = False
    rollout_fraction: float = 1.0
    cache_features: bool = True
    beta: float = 0.6


@dataclass
class JCMValidationSection:
    """Validation every ``every`` optimizer steps (0: only at the end): judge/IoU rank correlation and
    chained Dice/cIoU with JCM at ``jcm.beta`` versus JCM off."""

    every: int = 0
    at_start: bool = False
    max_dialogues: int | None = 50


@dataclass
class JCMRecipe(TrainingSettings):
    """A stage-2 run. ``model`` is the frozen MediRound checkpoint folder (``--model``). The optimiser
    defaults are stage 1's, as in the paper ("we keep the same hyperparameter settings")."""

    output: str = ""
    model: str = ""
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    jcm: JCMSection = field(default_factory=JCMSection)
    validation: JCMValidationSection = field(default_factory=JCMValidationSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        data = plain_data(self)
        data.pop("source")
        return data

    @property
    def hash(self) -> str:
        """Identity of the run: everything but the output folder (the model folder's manifest included)."""
        data = self.to_dict()
        data.pop("output")
        manifest = Path(self.model) / "manifest.json"
        data["model_manifest"] = manifest.read_text(encoding="utf-8") if manifest.is_file() else None
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_jcm_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> JCMRecipe:
    """Read a stage-2 recipe YAML, apply ``key=value`` overrides, check every key, type, file and folder."""
    source = str(path)
    raw = read_recipe_file(path, overrides)
    known = {f for f in JCMRecipe.__dataclass_fields__} - {"source"}
    recipe = build_dataclass(JCMRecipe, raw, "", source, known=known)
    recipe.source = source
    _check_values(recipe, source)
    return recipe


def _check_values(recipe: JCMRecipe, source: str) -> None:
    def fail(key: str, reason: str) -> None:
        raise RecipeError(f"{source}: key '{key}': {reason}")

    if not recipe.output:
        fail("output", "missing: name the folder that receives checkpoints and the trained model")
    if not recipe.model:
        fail("model", "missing: pass --model CKPT (a MediRound checkpoint folder from `mediround train`)")
    if not (Path(recipe.model) / "manifest.json").is_file():
        fail("model", f"not a MediRound checkpoint folder (no manifest.json): {recipe.model}")
    if Path(recipe.output).resolve() == Path(recipe.model).resolve():
        fail("output", "must differ from the model folder (train-jcm writes a new checkpoint)")
    if not recipe.data.train:
        fail("data.train", "missing: name the training dialogue file")
    for key in ("train", "val"):
        value = getattr(recipe.data, key)
        if value and not Path(value).is_file():
            fail(f"data.{key}", f"file not found: {value}")
    if recipe.data.root is not None and not Path(recipe.data.root).is_dir():
        fail("data.root", f"folder not found: {recipe.data.root}")
    for key, value in {"train.batch_size": recipe.train.batch_size, "train.grad_accum": recipe.train.grad_accum,
                       "train.epochs": recipe.train.epochs, "checkpoint.keep_last": recipe.checkpoint.keep_last,
                       "log.every": recipe.log.every}.items():
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    for key, value in {"train.warmup_steps": recipe.train.warmup_steps, "validation.every": recipe.validation.every,
                       "checkpoint.every": recipe.checkpoint.every, "jcm.judge_weight": recipe.jcm.judge_weight,
                       "jcm.refine_bce_weight": recipe.jcm.refine_bce_weight,
                       "jcm.refine_dice_weight": recipe.jcm.refine_dice_weight}.items():
        if value < 0:
            fail(key, f"must not be negative, got {value}")
    if recipe.train.max_steps is not None and recipe.train.max_steps < 1:
        fail("train.max_steps", f"must be at least 1, got {recipe.train.max_steps}")
    if recipe.train.lr <= 0:
        fail("train.lr", f"must be positive, got {recipe.train.lr}")
    if recipe.train.mixed_precision not in MIXED_PRECISION:
        fail("train.mixed_precision", f"{recipe.train.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
    if not 0 <= recipe.jcm.rollout_fraction <= 1:
        fail("jcm.rollout_fraction", f"must be in [0, 1], got {recipe.jcm.rollout_fraction}")
    if not 0 <= recipe.jcm.beta <= 1:
        fail("jcm.beta", f"must be in [0, 1], got {recipe.jcm.beta}")
    if recipe.validation.max_dialogues is not None and recipe.validation.max_dialogues < 1:
        fail("validation.max_dialogues", "must be at least 1 (or null for all)")


def check_jcm_output(recipe: JCMRecipe, resume: bool, overwrite: bool) -> None:
    """Before any launch: the model checkpoint's files match its manifest (``CheckpointError`` naming the
    file), and stage 1's output rules (``recipe.check_output``: another run's folder is refused)."""
    from mediround.model.checkpoint import verify_manifest
    from mediround.training.recipe import check_output

    verify_manifest(Path(recipe.model))
    check_output(recipe, resume=resume, overwrite=overwrite)


class JCMObjective(nn.Module):
    """The stage-2 loss sums of a list of (features, IoU targets, dialogue) items: the trainable JCM and
    the frozen segmenter it decodes through. Returns per-mask sums; the caller divides by the mask count."""

    def __init__(self, jcm: nn.Module, decoder_owner: Any):
        super().__init__()
        self.jcm = jcm
        # Kept outside the module tree: DDP then wraps, broadcasts and moves only the JCM weights.
        self._decoder_owner = (decoder_owner,)

    def forward(self, items: list[tuple[torch.Tensor, torch.Tensor, DialogueFeatures]]) -> torch.Tensor:
        from mediround.model.mediround import bce_loss, dice_loss

        model = self._decoder_owner[0]
        dtype = next(self.jcm.parameters()).dtype
        judge = refine_bce = refine_dice = next(self.jcm.parameters()).new_zeros(())
        for features, iou, entry in items:
            if features.shape[0] == 0:
                continue
            features = features.to(dtype)
            logits = self.jcm.judge_logits(features)
            judge = judge + nn.functional.binary_cross_entropy_with_logits(logits, iou.to(dtype), reduction="sum")
            refined = decode_at_supervision_size(model, entry.embedding, self.jcm.refine(features), entry.size)
            targets = entry.targets.to(refined.dtype)
            count = features.shape[0]
            refine_bce = refine_bce + bce_loss(refined, targets) * count
            refine_dice = refine_dice + dice_loss(refined, targets) * count
        return torch.stack([judge, refine_bce, refine_dice])


def jcm_losses(model: Any, entries: list[DialogueFeatures], source: str) -> dict[str, float]:
    """Mean per-mask judge BCE, refine BCE and refine Dice of ``model.jcm`` on cached features."""
    objective = JCMObjective(model.jcm, model)
    items = [(e.features[source], e.iou[source], e) for e in entries]
    masks = sum(e.features[source].shape[0] for e in entries)
    with torch.no_grad():
        sums = objective(items)
    return {key: float(value) / max(1, masks) for key, value in zip(LOSS_KEYS, sums)}


@dataclass
class JCMResult:
    """What a stage-2 run did; ``model`` is the new checkpoint folder (None when interrupted)."""

    output: Path
    step: int
    total_steps: int
    world_size: int
    stopped: str
    checkpoint: Path | None
    model: Path | None
    first_loss: dict[str, float] | None = None
    last_loss: dict[str, float] | None = None
    validations: list[dict] = field(default_factory=list)
    data_problems: int = 0


def run_jcm_training(
    recipe: JCMRecipe,
    *,
    resume: bool = False,
    cpu: bool = True,
    expected_processes: int = 1,
    on_event: EventHandler | None = None,
    allow_partial_load: bool = False,
) -> JCMResult:
    """Train JCM in this process (one of ``expected_processes``); ``on_event`` runs on the main process.
    ``allow_partial_load`` loads a checkpoint whose weight files miss or add keys (a ``load`` event lists
    what was left random)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if cpu:
        torch.set_num_threads(recipe.train.threads or max(1, (os.cpu_count() or 1) // expected_processes))
    accelerator = Accelerator(cpu=cpu, mixed_precision=recipe.resolved_mixed_precision(on_gpu=not cpu))
    check_world_size(accelerator.num_processes, expected_processes, accelerator.process_index)
    set_seed(recipe.train.seed)
    return _JCMTrainer(recipe, accelerator, on_event, allow_partial_load).run(resume)


class _JCMTrainer(TrainingProcess):
    def run(self, resume: bool) -> JCMResult:
        from mediround.model import load_sample
        from mediround.model.checkpoint import load_checkpoint

        recipe = self.recipe
        start = self.begin(resume)
        train_dialogues, val_dialogues, resume_from, state = (start.train_dialogues, start.val_dialogues,
                                                              start.resume_from, start.state)

        model = load_checkpoint(recipe.model, device=self.accelerator.device, allow_partial=self.allow_partial_load)
        if self.allow_partial_load:
            self.emit("load", reports=[asdict(report) for report in model.load_reports])
        model.requires_grad_(False)
        model.eval()
        jcm = model.jcm.float().requires_grad_(True)
        if resume_from is not None:
            checkpointing.load_trainable(jcm, resume_from)
        optimizer = torch.optim.AdamW(jcm.parameters(), lr=recipe.train.lr, betas=recipe.train.betas,
                                      eps=recipe.train.eps, weight_decay=recipe.train.weight_decay)
        steps = total_steps(recipe, len(train_dialogues), self.world_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(recipe.train.warmup_steps, steps))
        objective = JCMObjective(jcm, model)
        wrapped, optimizer = self.accelerator.prepare(objective, optimizer)
        step, position = self.restore(start, optimizer, scheduler)
        self.model, self.jcm, self.wrapped, self.optimizer, self.scheduler = model, jcm, wrapped, optimizer, scheduler
        self.val_dialogues = val_dialogues
        self.val_cache: list[tuple[Any, DialogueFeatures]] | None = None
        autocast = self.accelerator.autocast
        self.cache = FeatureCache(model, lambda i: load_sample(train_dialogues[i]), recipe.jcm.cache_features,
                                  autocast)
        stream = self.stream(len(train_dialogues), position)
        result = JCMResult(self.output, step, steps, self.world_size, "finished", None, None,
                           data_problems=len(start.problems))
        self.emit("start", step=step, total_steps=steps, world_size=self.world_size,
                  global_batch=recipe.global_batch(self.world_size), recipe_hash=recipe.hash,
                  resumed_from=str(resume_from) if resume_from else None, train_dialogues=len(train_dialogues),
                  val_dialogues=len(val_dialogues), rollout=recipe.jcm.rollout,
                  rollout_fraction=recipe.jcm.rollout_fraction if recipe.jcm.rollout else 0.0,
                  data_problems=[p.one_line() for p in start.problems[:20]])
        if state is None and recipe.validation.at_start and val_dialogues:
            result.validations.append(self.validate(0))
        return self.run_loop(lambda stop: self._loop(result, stream, stop, step, steps))

    def _loop(self, result: JCMResult, stream: ShardedStream, stop: StopFlag, step: int, steps: int) -> JCMResult:
        recipe = self.recipe
        while step < steps:
            started = time.perf_counter()
            micro, read_at = [], []
            for _ in range(recipe.train.grad_accum):
                epoch = stream.position.epoch if stream.position.batch < stream.per_epoch else stream.position.epoch + 1
                indices = stream.next_indices()
                sources = rollout_sources(indices, recipe.train.seed, epoch, recipe.jcm.rollout,
                                          recipe.jcm.rollout_fraction)
                entries = self.cache.get(indices, sources)
                micro.append([(e.features[s], e.iou[s], e) for e, s in zip(entries, sources)])
                read_at.append(stream.position)
            position = stream.position
            losses = self._accumulate(micro)
            grad_norm = float(self.accelerator.clip_grad_norm_(self.jcm.parameters(),
                                                               recipe.train.clip_grad_norm or math.inf))
            if not all(math.isfinite(v) for v in losses.values()) or not math.isfinite(grad_norm):
                raise TrainingError(f"non-finite JCM loss or gradient at step {step + 1} (epoch {read_at[0].epoch}, "
                                    f"batch {read_at[0].batch - 1}); nothing was written for this step: {losses}")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            result.first_loss = result.first_loss or losses
            result.last_loss = losses
            if step % recipe.log.every == 0 or step == 1 or step == steps:
                self.emit("step", step=step, **losses, lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                          samples_per_s=recipe.global_batch(self.world_size) / (time.perf_counter() - started),
                          epoch=position.epoch)
            result.step = step
            interrupted = self.any_process(stop.raised)
            every = recipe.validation.every
            if self.val_dialogues and ((every and step % every == 0) or step == steps):
                result.validations.append(self.validate(step))
            if (recipe.checkpoint.every and step % recipe.checkpoint.every == 0) or step == steps or interrupted:
                result.checkpoint = self.save(step, position)
            if interrupted:
                result.stopped = "interrupted"
                break
        if result.stopped == "finished":
            result.model = self.save_model()
        self.emit("end", step=step, stopped=result.stopped,
                  checkpoint=str(result.checkpoint) if result.checkpoint else None,
                  model=str(result.model) if result.model else None)
        return result

    def _accumulate(self, micro: list[list]) -> dict[str, float]:
        """Forward/backward of one optimizer step; returns the global-batch losses (means over masks)."""
        local = torch.tensor(float(sum(f.shape[0] for items in micro for f, _, _ in items)), dtype=torch.float64)
        masks = float(self.accelerator.reduce(local.to(self.accelerator.device), "sum"))
        scale = self.world_size / max(1.0, masks)
        jcm = self.recipe.jcm
        weights = torch.tensor([jcm.judge_weight, jcm.refine_bce_weight, jcm.refine_dice_weight])
        report = torch.zeros(3, dtype=torch.float64)
        for index, items in enumerate(micro):
            syncing = index == len(micro) - 1
            context = self.accelerator.no_sync(self.wrapped) if not syncing else contextlib.nullcontext()
            with context, self.accelerator.autocast():
                sums = self.wrapped(items)
                loss = (sums.float() * weights.to(sums.device)).sum() * scale
                self.accelerator.backward(loss)
            report += sums.detach().double().cpu() * scale
        total = self.accelerator.reduce(report.to(self.accelerator.device), "sum").cpu() / self.world_size
        losses = dict(zip(LOSS_KEYS, (float(v) for v in total)))
        losses["loss"] = float((total.float() * weights).sum())
        return losses

    def validate(self, step: int) -> dict:
        """``evaluate_jcm`` on this process's share of the validation dialogues, gathered on the main process."""
        from accelerate.utils import gather_object

        from mediround.model import load_sample

        indices = validation_shard(len(self.val_dialogues), self.world_size, self.rank,
                                   self.recipe.validation.max_dialogues)
        if self.val_cache is None:
            samples = [load_sample(self.val_dialogues[i]) for i in indices]
            self.val_cache = list(zip(samples, _collect_each(self.model, samples, self.accelerator.autocast)))
        pieces = gather_object([jcm_evaluation_rows(self.model, self.val_cache, self.recipe.jcm.beta)])
        summary = {"step": step, **summarize_evaluation(pieces, self.recipe.jcm.beta)}
        if self.is_main:
            self.emit("validation", **summary)
        return summary

    def save(self, step: int, position: StreamPosition) -> Path:
        """The JCM weights, optimizer, scheduler, RNG and stream position (stage 1's checkpoint files)."""
        return self.write_checkpoint(step, position, self.jcm)

    def save_model(self) -> Path:
        """The frozen MediRound with the trained JCM as a new checkpoint, config flag ``trainable.jcm``."""
        folder = self.output / MODEL_FOLDER
        if self.is_main:
            write_trained_model(self.model, folder)
        self.accelerator.wait_for_everyone()
        return folder


def write_trained_model(model: Any, folder: Path) -> Path:
    """Save ``model`` (whose JCM was trained) atomically with ``trainable.jcm`` set, so ``infer``/``eval``
    default to JCM at beta 0.6; every other weight is the input checkpoint's."""
    from mediround.model.build import DTYPES, apply_trainability
    from mediround.model.checkpoint import save_checkpoint

    model.jcm.to(DTYPES[model.config.precision])
    model.config.trainable.jcm = True
    apply_trainability(model)
    return save_checkpoint(model, folder)


def _collect_each(model: Any, samples: list, autocast: Callable[[], Any]) -> list[DialogueFeatures]:
    entries = []
    for sample in samples:
        entries.extend(collect_features(model, [sample], (TEACHER_FORCED, ROLLOUT), autocast))
    return entries


@torch.no_grad()
def jcm_evaluation_rows(model: Any, cached: list[tuple[Any, DialogueFeatures]], beta: float) -> dict:
    """Raw material of a JCM evaluation on some dialogues: per source the judge scores and true IoUs of
    the raw masks, and metric rows of the chained predictions with JCM off and at ``beta``."""
    from mediround.inference.chain import Track, chain_dialogue
    from mediround.metrics import counts

    judged: dict[str, dict[str, list[float]]] = {s: {"score": [], "iou": []} for s in (TEACHER_FORCED, ROLLOUT)}
    rows: dict[str, list[dict]] = {"off": [], "jcm": []}
    for sample, entry in cached:
        for source in judged:
            if entry.features[source].shape[0]:
                scores = model.jcm.judge(entry.features[source].to(next(model.jcm.parameters()).dtype))
                judged[source]["score"].extend(scores.float().cpu().tolist())
                judged[source]["iou"].extend(entry.iou[source].float().cpu().tolist())
        tracks = {"off": Track(beta=None), "jcm": Track(beta=beta)}
        chained = chain_dialogue(model, sample.dialogue, sample.image, list(tracks.values()))
        for name, track in tracks.items():
            for prediction, truth in zip(chained[track], sample.masks):
                if truth is None:
                    continue
                scored = counts(prediction.mask[None], np.asarray(truth, dtype=bool)[None])
                rows[name].append({key: scored[key][0].item() for key in ("intersection", "union", "iou", "dice")}
                                  | {"round": prediction.round, "refined": prediction.refined})
    return {"judged": judged, "rows": rows}


def summarize_evaluation(pieces: list[dict], beta: float) -> dict:
    """Spearman of judge score vs true IoU per feature source, and Dice/gIoU/cIoU of the chained
    predictions with JCM off and at ``beta`` (with the share of refined rounds)."""
    from mediround.metrics import aggregate

    summary: dict[str, Any] = {"beta": beta}
    for source in (TEACHER_FORCED, ROLLOUT):
        scores = [v for p in pieces for v in p["judged"][source]["score"]]
        ious = [v for p in pieces for v in p["judged"][source]["iou"]]
        summary[f"spearman_{source}"] = spearman(scores, ious)
    for name in ("off", "jcm"):
        rows = [r for p in pieces for r in p["rows"][name]]
        scores = aggregate(rows)
        summary[f"{name}_dice"], summary[f"{name}_giou"], summary[f"{name}_ciou"] = scores.dice, scores.giou, scores.ciou
        summary[f"{name}_masks"] = scores.count
        if name == "jcm":
            summary["refined_share"] = float(np.mean([r["refined"] for r in rows])) if rows else float("nan")
    return summary
