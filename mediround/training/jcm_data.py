"""What JCM trains on: [SEG] features of a frozen MediRound, computed once and cached per dialogue.

Everything of MediRound is frozen in stage 2, so for a given dialogue the [SEG] features, the SAM image
embedding, the raw masks and hence the judge's targets never change. They are computed once (in
``no_grad``, no backward through the language model) and the two small MLPs are then trained on the
cache; each step only runs the MLPs and the mask decoder.

Two sources of features:

- ``teacher-forced``: the stage-1 forward, every reference crop/box built from the ground-truth mask
  (what the paper trains JCM on), in ``eval()`` mode, or in ``train()`` mode (``jcm.feature_mode: train``,
  LoRA dropout on, as the authors' stage 2; then features differ on every call and are not cached);
- ``rollout``: Algorithm 1 with JCM off (``mediround.inference.chain``), every reference built from the
  model's own predicted mask of the referred round: the features JCM meets at inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mediround.inference.chain import Track, chain_dialogue
from mediround.metrics import counts
from mediround.model import ImageContext, MediRound, encode_image
from mediround.model.frame import ImageFrame, mask_from_logits
from mediround.model.processor import DialogueSample

TEACHER_FORCED = "teacher-forced"
ROLLOUT = "rollout"
SOURCES = (TEACHER_FORCED, ROLLOUT)


@dataclass
class DialogueFeatures:
    """One dialogue's frozen-model outputs: SAM embedding (1, 256, g, g), its image's frame, ground-truth
    masks where they are supervised (``heads.mask_loss_frame``) (n, h, w) bool, and per source the [SEG] features (n, 256) and
    the IoU of their raw masks with the ground truth (n,). Only rounds with a ground-truth mask are kept
    (n of them)."""

    embedding: torch.Tensor
    frame: ImageFrame
    targets: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    iou: dict[str, torch.Tensor] = field(default_factory=dict)


def decode_at_supervision_size(model: Any, entry: DialogueFeatures, features: torch.Tensor) -> torch.Tensor:
    """(n, 256) features -> (n, h, w) float logits where masks are supervised (``heads.mask_loss_frame``:
    the entry's resized frame or the original size) through the frozen decoder.

    Gradients flow to ``features`` (the refine MLP's output), never into the decoder's frozen weights.
    """
    return entry.frame.supervised_logits(model.decode_low_res(entry.embedding, features),
                                         model.config.heads.mask_loss_frame)


def raw_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with the targets, per mask, by ``mediround.metrics`` (1.0 when both are empty)."""
    return torch.from_numpy(counts(mask_from_logits(logits), targets.cpu().numpy())["iou"]).float()


def original_iou(logits: torch.Tensor, frame: ImageFrame, masks: Sequence[np.ndarray]) -> torch.Tensor:
    """The authors' judge target (``heads.judge_iou: original``): IoU of (logits > 0), brought back to the
    original size, with the original-size ground truth ``masks``, as intersection / (union + 1e-6), so 0
    when both are empty."""
    if not masks:
        return torch.zeros(0)
    predicted = torch.from_numpy(mask_from_logits(frame.to_original(logits)))
    truth = torch.from_numpy(np.stack([np.asarray(mask, dtype=bool) for mask in masks]))
    intersection = (predicted & truth).sum(dim=(1, 2)).float()
    return intersection / ((predicted | truth).sum(dim=(1, 2)).float() + 1e-6)


def rollout_features(model: MediRound, sample: DialogueSample, context: ImageContext) -> torch.Tensor:
    """The [SEG] features of every round when the dialogue is chained with JCM off: each reference is the
    model's own mask of the referred round (Algorithm 1). (rounds, 256)."""
    track = Track(beta=None)
    predictions = chain_dialogue(model, sample.dialogue, sample.image, [track], context=context)[track]
    return torch.stack([prediction.seg_feature for prediction in predictions])


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    """``model`` in ``train()`` (dropout on) or ``eval()`` mode inside the block, its mode restored after."""
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def collect_features(model: Any, samples: Sequence[Any], sources: Sequence[str],
                     autocast: Callable[[], Any] | None = None, train_mode: bool = False) -> list[DialogueFeatures]:
    """Frozen-model features of ``samples`` from each of ``sources``; the teacher-forced ones come from
    one batched stage-1 forward, in ``train()`` mode when ``train_mode`` (the authors' stage 2: LoRA dropout
    on, so the features and the judge targets decoded from them are a random draw), else ``eval()``."""
    autocast = autocast or contextlib.nullcontext
    entries = []
    with autocast():
        contexts = [encode_image(model, sample.image) for sample in samples]
        forced = None
        if TEACHER_FORCED in sources:
            with module_mode(model, train_mode):
                forced = model(model.processor.collate(list(samples))).seg_features
        for index, (sample, context) in enumerate(zip(samples, contexts)):
            valid = [i for i, mask in enumerate(sample.masks) if mask is not None]
            targets = context.frame.supervised_masks([sample.masks[i] for i in valid],
                                                     model.config.heads.mask_loss_frame)
            entry = DialogueFeatures(context.sam_embedding, context.frame, targets.to(context.sam_embedding.device))
            for source in sources:
                features = forced[index] if source == TEACHER_FORCED else rollout_features(model, sample, context)
                features = features[valid].detach()
                logits = decode_at_supervision_size(model, entry, features)
                entry.features[source] = features
                if model.config.heads.judge_iou == "original":
                    iou = original_iou(logits, context.frame, [sample.masks[i] for i in valid])
                else:
                    iou = raw_iou(logits, targets)
                entry.iou[source] = iou.to(features.device)
            entries.append(entry)
    return entries


class FeatureCache:
    """Features per dialogue index, computed on first use; ``keep=False`` computes them for every use
    (for data sets whose image embeddings do not fit in memory, and for ``train_mode`` features, a fresh
    draw of dropout each time)."""

    def __init__(self, model: Any, load: Callable[[int], Any], keep: bool = True,
                 autocast: Callable[[], Any] | None = None, train_mode: bool = False):
        self.model = model
        self.load = load
        self.keep = keep
        self.autocast = autocast
        self.train_mode = train_mode
        self.entries: dict[int, DialogueFeatures] = {}

    def get(self, indices: Sequence[int], sources: Sequence[str]) -> list[DialogueFeatures]:
        """Entries of ``indices`` holding the given source of each (one source per index)."""
        missing: dict[str, list[int]] = {}
        for index, source in zip(indices, sources):
            entry = self.entries.get(index)
            if entry is None or source not in entry.features:
                missing.setdefault(source, []).append(index)
        fresh: dict[tuple[int, str], DialogueFeatures] = {}
        for source, wanted in missing.items():
            unique = list(dict.fromkeys(wanted))
            computed = collect_features(self.model, [self.load(i) for i in unique], [source], self.autocast,
                                        self.train_mode)
            for index, entry in zip(unique, computed):
                fresh[(index, source)] = entry
                if self.keep:
                    held = self.entries.setdefault(index, entry)
                    held.features.update(entry.features)
                    held.iou.update(entry.iou)
        return [self.entries[i] if self.keep else fresh[(i, s)] for i, s in zip(indices, sources)]


def rollout_sources(indices: Sequence[int], seed: int, epoch: int, rollout: bool, fraction: float) -> list[str]:
    """The feature source of each dialogue in one epoch: a fixed draw per (seed, epoch, dialogue)."""
    if not rollout or fraction <= 0:
        return [TEACHER_FORCED] * len(indices)
    if fraction >= 1:
        return [ROLLOUT] * len(indices)
    draws = [np.random.default_rng([seed, epoch, index]).random() for index in indices]
    return [ROLLOUT if draw < fraction else TEACHER_FORCED for draw in draws]
