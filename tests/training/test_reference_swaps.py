"""Reference swaps (``augment.reference_swap``): which references change, that targets never do, and that
the choice is a function of seed, epoch and dialogue."""

from __future__ import annotations

import numpy as np
import torch

from mediround.data.formats import load_dialogues
from mediround.model import DialogueProcessor, load_sample
from mediround.training.reference_swaps import ReferenceSwaps
from tests.model.model_fixtures import tiny_model


def _samples(synth_data):
    return [load_sample(dialogue) for dialogue in load_dialogues(synth_data / "train.jsonl").dialogues]


def _distinct_others(sample, index: int) -> list[np.ndarray]:
    referenced = sample.masks[sample.dialogue.rounds[index].ref - 1]
    return [mask for number, mask in enumerate(sample.masks)
            if number not in (index, sample.dialogue.rounds[index].ref - 1) and not np.array_equal(mask, referenced)]


def test_every_swap_is_another_rounds_mask_and_probability_one_swaps_all_it_can(synth_data):
    samples = _samples(synth_data)
    swapped = 0
    for sample in samples:
        changed = ReferenceSwaps(1.0, seed=0)(sample, epoch=0)
        assert changed.masks is sample.masks  # targets untouched
        for index, round_ in enumerate(sample.dialogue.rounds):
            if round_.ref is None:
                assert index not in changed.reference_masks
                continue
            others = _distinct_others(sample, index)
            assert (index in changed.reference_masks) == bool(others)
            if others:
                assert any(np.array_equal(changed.reference_mask(index), mask) for mask in others)
                swapped += 1
    assert swapped >= 10
    assert all(ReferenceSwaps(0.0, seed=0)(sample, 0) is sample for sample in samples)


def test_swaps_depend_on_seed_epoch_and_dialogue_only(synth_data):
    samples = _samples(synth_data)

    def chosen(seed: int, epoch: int) -> list[tuple[str, int, bytes]]:
        return [(sample.dialogue.id, index, mask.tobytes())
                for sample in samples
                for index, mask in sorted(ReferenceSwaps(0.5, seed)(sample, epoch).reference_masks.items())]

    assert chosen(0, 0) == chosen(0, 0)
    assert chosen(0, 0) != chosen(0, 1)
    assert chosen(0, 0) != chosen(1, 0)


def test_a_swapped_reference_reaches_the_crop_and_box_and_nothing_else(synth_data):
    model = tiny_model()
    processor: DialogueProcessor = model.processor
    sample = next(s for s in _samples(synth_data) if ReferenceSwaps(1.0, 0)(s, 0).reference_masks)
    changed = ReferenceSwaps(1.0, 0)(sample, 0)
    plain, swapped = processor.collate([sample]), processor.collate([changed])
    referring = [index for index, round_ in enumerate(sample.dialogue.rounds) if round_.ref is not None]
    for row, index in enumerate(referring):
        same = index not in changed.reference_masks
        assert torch.equal(plain.boxes[row], swapped.boxes[row]) == same
    for field in ("input_ids", "labels", "sam_pixels", "clip_pixels"):
        assert torch.equal(getattr(plain, field), getattr(swapped, field)), field
    for a, b in zip(plain.target_masks, swapped.target_masks):
        assert torch.equal(a, b)
