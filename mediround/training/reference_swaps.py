"""Reference swaps (recipe key ``augment.reference_swap``, stage 1 only, not in the paper): a referring
round sometimes takes its crop and box from the wrong mask while its target stays the right one.

Teacher forcing always shows the ground-truth mask of the referenced round, but chained inference shows the
model's own earlier mask, and when that mask is a wrong entity a model that always trusts its reference
answers next to the wrong entity. With probability ``probability`` per referring round, the reference is
cut from the ground-truth mask of another round of the same dialogue (another entity of the same image:
the error a chained model makes most), so that the model also learns what the query and the image say
when the reference does not fit them. The choice is a function of the run's seed, the epoch and the
dialogue id, so it is the same on every process, data worker and resumed run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from mediround.model.processor import DialogueSample


@dataclass(frozen=True)
class ReferenceSwaps:
    """``augment(sample, epoch)`` for ``DialogueDataset``: swaps references with ``probability``."""

    probability: float
    seed: int

    def __call__(self, sample: DialogueSample, epoch: int) -> DialogueSample:
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(sample.dialogue.id.encode("utf-8"))])
        swaps: dict[int, np.ndarray] = {}
        for index, round_ in enumerate(sample.dialogue.rounds):
            if round_.ref is None or rng.random() >= self.probability:
                continue
            referenced = sample.masks[round_.ref - 1]
            others = [mask for number, mask in enumerate(sample.masks)
                      if number not in (index, round_.ref - 1) and mask is not None
                      and (referenced is None or not np.array_equal(mask, referenced))]
            if others:
                swaps[index] = others[int(rng.integers(len(others)))]
        if not swaps:
            return sample
        return DialogueSample(sample.dialogue, sample.image, sample.masks, {**sample.reference_masks, **swaps})
