"""Stage 2: train the Judgment & Correction Mechanism on a frozen MediRound (the ``Objective`` the engine
runs for ``mediround train-jcm``).

Everything of MediRound is frozen and the text loss is off. For each [SEG] feature ``h`` of a round with a
ground-truth mask ``G``:

- judge: binary cross-entropy of ``judge(h)`` towards the soft target ``IoU(decode(h) > 0, G)``, x2;
- refine: ``decode(refine(h))`` through the frozen mask decoder, BCE x2 + Dice x0.5 against ``G``;

each a sum over masks divided by the number of masks of the global batch (as stage 1 does, so the step
does not depend on how the batch is split over processes), or with ``train.loss_averaging:
micro-batch-mean`` by each micro-batch's own masks, the micro-batch means then averaged (the authors'
way). Features come from ``jcm_data`` (computed once per dialogue and cached) and are teacher-forced
or, with ``jcm.rollout``, produced by chaining the model's own masks. The result is a new MediRound
checkpoint (``<output>/model``) whose config says JCM is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from torch import nn

from mediround.inference.chain import Track, chain_dialogue
from mediround.metrics import METRICS, aggregate, counts, spearman
from mediround.model import load_sample
from mediround.model.build import DTYPES, apply_trainability
from mediround.model.checkpoint import load_checkpoint, save_checkpoint, verify_manifest
from mediround.model.losses import bce_loss, dice_loss
from mediround.training.data import StreamPosition, validation_shard
from mediround.training.engine import (
    MicroBatch,
    ModelParts,
    Objective,
    RunStart,
    TrainingEngine,
    TrainingResult,
    micro_batch_scales,
    run_stage,
)
from mediround.training.events import ChainedScores, Event, EventHandler, JCMRunStarted, JCMValidated
from mediround.training.jcm_data import (
    ROLLOUT,
    TEACHER_FORCED,
    DialogueFeatures,
    FeatureCache,
    collect_features,
    decode_at_supervision_size,
    rollout_sources,
)
from mediround.training.recipe import JCMRecipe, check_output

LOSS_KEYS = ("judge", "refine_bce", "refine_dice")


def run_jcm_training(recipe: JCMRecipe, *, resume: bool = False, cpu: bool = True, expected_processes: int = 1,
                     on_event: EventHandler | None = None, allow_partial_load: bool = False,
                     deepspeed_config: str | None = None) -> TrainingResult:
    """Train JCM in this process (``engine.run_stage`` says how); ``allow_partial_load`` loads a checkpoint
    whose weight files miss or add keys."""
    return run_stage(JudgeAndRefine(recipe), recipe, resume=resume, cpu=cpu, expected_processes=expected_processes,
                     on_event=on_event, allow_partial_load=allow_partial_load, deepspeed_config=deepspeed_config)


def check_jcm_output(recipe: JCMRecipe, resume: bool, overwrite: bool) -> None:
    """Before any launch: the model checkpoint's files match its manifest (``CheckpointError`` naming the
    file), and stage 1's output rules (``recipe.check_output``: another run's folder is refused)."""
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
        model = self._decoder_owner[0]
        dtype = next(self.jcm.parameters()).dtype
        judge = refine_bce = refine_dice = next(self.jcm.parameters()).new_zeros(())
        for features, iou, entry in items:
            if features.shape[0] == 0:
                continue
            features = features.to(dtype)
            logits = self.jcm.judge_logits(features)
            judge = judge + nn.functional.binary_cross_entropy_with_logits(logits, iou.to(dtype), reduction="sum")
            refined = decode_at_supervision_size(model, entry, self.jcm.refine(features))
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


class JudgeAndRefine(Objective):
    """Stage 2's objective: the JCM judge and refine MLPs on cached [SEG] features of a frozen MediRound."""

    loss_name = "JCM loss"

    def __init__(self, recipe: JCMRecipe):
        self.recipe = recipe

    def build(self, engine: TrainingEngine, start: RunStart) -> ModelParts:
        model = load_checkpoint(self.recipe.model, device=engine.accelerator.device,
                                allow_partial=engine.allow_partial_load)
        model.requires_grad_(False)
        model.eval()
        jcm = model.jcm.float().requires_grad_(True)
        self.model = model
        self.val_dialogues = start.val_dialogues
        self.val_cache: list[tuple[Any, DialogueFeatures]] | None = None
        return ModelParts(model, jcm, JCMObjective(jcm, model))

    def run_started(self, **fields: Any) -> JCMRunStarted:
        jcm = self.recipe.jcm
        return JCMRunStarted(**fields, rollout=jcm.rollout, rollout_fraction=jcm.rollout_fraction if jcm.rollout else 0.0)

    def micro_batches(self, engine: TrainingEngine, start: RunStart,
                      position: StreamPosition) -> Iterator[MicroBatch]:
        dialogues = start.train_dialogues
        cache = FeatureCache(self.model, lambda i: load_sample(dialogues[i]), self.recipe.jcm.cache_features,
                             engine.accelerator.autocast)
        stream = engine.stream(len(dialogues), position)
        train, jcm = self.recipe.train, self.recipe.jcm

        def read() -> Iterator[MicroBatch]:
            while True:
                # The epoch the next micro-batch belongs to: the stream moves on when this one is complete.
                at = stream.position
                epoch = at.epoch if at.batch < stream.per_epoch else at.epoch + 1
                indices = stream.next_indices()
                sources = rollout_sources(indices, train.seed, epoch, jcm.rollout, jcm.rollout_fraction)
                entries = cache.get(indices, sources)
                yield MicroBatch([(e.features[s], e.iou[s], e) for e, s in zip(entries, sources)], stream.position,
                                 [dialogues[i].id for i in indices])

        return read()

    def accumulate(self, engine: TrainingEngine, micro: list[MicroBatch]) -> tuple[float, dict[str, float], bool]:
        accelerator = engine.accelerator
        counts = [float(sum(f.shape[0] for f, _, _ in batch.data)) for batch in micro]
        local = torch.tensor(sum(counts), dtype=torch.float64)
        masks = float(accelerator.reduce(local.to(accelerator.device), "sum"))
        jcm = self.recipe.jcm
        weights = torch.tensor([jcm.judge_weight, jcm.refine_bce_weight, jcm.refine_dice_weight])
        report = torch.zeros(3, dtype=torch.float64)
        for index, batch in enumerate(micro):
            # The objective returns sums over masks: the scale of a mean, divided by the micro-batch's masks.
            scale = micro_batch_scales([counts[index]], [masks], engine.world_size, len(micro),
                                       self.recipe.train.loss_averaging)[0] / max(1.0, counts[index])
            with engine.accumulating(last=index == len(micro) - 1), accelerator.autocast():
                sums = engine.wrapped(batch.data)
                loss = (sums.float() * weights.to(sums.device)).sum() * scale
                engine.backward(loss)
            report += sums.detach().double().cpu() * scale
        total = accelerator.reduce(report.to(accelerator.device), "sum").cpu() / engine.world_size
        components = dict(zip(LOSS_KEYS, (float(v) for v in total)))
        loss = float((total.float() * weights).sum())
        nonfinite = not all(np.isfinite([loss, *components.values()]))
        return loss, components, nonfinite

    def validate(self, engine: TrainingEngine, step: int) -> JCMValidated:
        """``jcm_evaluation_rows`` on this process's share of the validation dialogues, gathered on every process."""
        indices = validation_shard(len(self.val_dialogues), engine.world_size, engine.rank,
                                   self.recipe.validation.max_dialogues)
        if self.val_cache is None:
            samples = [load_sample(self.val_dialogues[i]) for i in indices]
            self.val_cache = list(zip(samples, _collect_each(self.model, samples, engine.accelerator.autocast)))
        pieces = gather_object([jcm_evaluation_rows(self.model, self.val_cache, self.recipe.jcm.beta)])
        return summarize_evaluation(step, pieces, self.recipe.jcm.beta)

    def save_model(self, folder: Path) -> None:
        write_trained_model(self.model, folder)

    def best_score(self, event: Event, metric: str, best_of: str) -> float | None:
        return getattr(event.jcm, metric) if isinstance(event, JCMValidated) else None

    def save_best(self, folder: Path, write_extra: Callable[[Path], None]) -> None:
        """The model with the JCM weights as they are now and ``trainable.jcm`` set in its config (as
        ``write_trained_model`` writes at the end), leaving the JCM being trained in its fp32 and trainable."""
        config = self.model.config
        was_trained, config.trainable.jcm = config.trainable.jcm, True
        try:
            save_checkpoint(self.model, folder, write_extra)
        finally:
            config.trainable.jcm = was_trained


def write_trained_model(model: Any, folder: Path) -> Path:
    """Save ``model`` (whose JCM was trained) atomically with ``trainable.jcm`` set, so ``infer``/``eval``
    default to JCM at beta 0.6; every other weight is the input checkpoint's."""
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


def summarize_evaluation(step: int, pieces: list[dict], beta: float) -> JCMValidated:
    """Spearman of judge score vs true IoU per feature source, and Dice/gIoU/cIoU of the chained
    predictions with JCM off and at ``beta`` (with the share of refined rounds)."""
    spearmans = {}
    for source in (TEACHER_FORCED, ROLLOUT):
        scores = [v for p in pieces for v in p["judged"][source]["score"]]
        ious = [v for p in pieces for v in p["judged"][source]["iou"]]
        spearmans[source] = spearman(scores, ious)
    chained = {}
    for name in ("off", "jcm"):
        scores = aggregate([r for p in pieces for r in p["rows"][name]])
        chained[name] = ChainedScores(**{metric: getattr(scores, metric) for metric in METRICS}, masks=scores.count)
    refined = [r["refined"] for p in pieces for r in p["rows"]["jcm"]]
    return JCMValidated(step, beta, spearmans, chained["off"], chained["jcm"],
                        refined_share=float(np.mean(refined)) if refined else float("nan"))
