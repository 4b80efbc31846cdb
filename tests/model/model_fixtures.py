"""Shared builders for the model tests: a tiny model and synthetic dialogues with real masks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from mediround.data.dialogue import Dialogue, Round
from mediround.model import DialogueSample, build_model, preset


def tiny_model(seed: int = 0, **trainable):
    config = preset("tiny")
    config.mllm.seed = seed
    for key, value in trainable.items():
        setattr(config.trainable, key, value)
    torch.manual_seed(seed)
    return build_model(config)


def perturb_lora(model, scale: float = 0.2) -> None:
    """LoRA B starts at zero; give it weights so LoRA changes the outputs."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def image(seed: int = 0, size: int = 128, rounds: int = 0) -> np.ndarray:
    """Dim noise with each round's structure drawn brighter, so the structures are visible."""
    pixels = np.random.default_rng(seed).integers(0, 80, (size, size, 3), dtype=np.uint8)
    for index in range(rounds):
        pixels[box_mask(index, size)] += np.uint8(40 + 30 * (index % 5))
    return pixels


def box_mask(index: int, size: int = 128) -> np.ndarray:
    """Round ``index``'s structure: a box filling most of quadrant ``index % 4`` (rounds 1-4 never overlap)."""
    mask = np.zeros((size, size), dtype=bool)
    half = size // 2
    top, left = (index // 2 % 2) * half + half // 8, (index % 2) * half + half // 8
    mask[top : top + 3 * half // 4, left : left + 3 * half // 4] = True
    return mask


def sample(rounds: int, seed: int = 0, size: int = 128) -> DialogueSample:
    """A dialogue whose round r > 1 refers to round r - 1, with box-shaped ground-truth masks."""
    items = [
        Round(query=f"Segment structure {i + 1}.", answer=f"It is structure {i + 1} [SEG].", mask=f"m{i}.png",
              ref=i if i > 0 else None)
        for i in range(rounds)
    ]
    return DialogueSample(Dialogue(id=f"d{rounds}", image="x.png", rounds=items), image(seed, size, rounds),
                          [box_mask(i, size) for i in range(rounds)])


def quadrant_sample(quadrant: int, seed: int = 0, size: int = 128) -> DialogueSample:
    """A one-round dialogue whose only structure (drawn brighter) is the box in ``quadrant``."""
    pixels = np.random.default_rng(seed).integers(0, 80, (size, size, 3), dtype=np.uint8)
    mask = box_mask(quadrant, size)
    pixels[mask] += np.uint8(100)
    dialogue = Dialogue(id=f"q{quadrant}", image="x.png", rounds=[Round(query="Segment the structure.",
                                                                         answer="It is here [SEG].", mask="m.png")])
    return DialogueSample(dialogue, pixels, [mask])


RELOAD = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[3])
    from model_fixtures import sample
    from mediround.model.checkpoint import load_checkpoint
    torch.set_num_threads(1)
    model = load_checkpoint(sys.argv[1]).eval()
    with torch.no_grad():
        output = model(model.processor.collate([sample(int(sys.argv[4]), seed=int(sys.argv[5]))]))
    save_file({"features": output.seg_features[0], "masks": output.mask_logits[0]}, sys.argv[2])
    """
)


def outputs_in_fresh_process(folder: Path, work: Path, sample_rounds: int, sample_seed: int) -> dict:
    """Load the checkpoint in a new Python process and return its [SEG] features and mask logits."""
    from safetensors.torch import load_file

    script, out = work / "reload.py", work / "reloaded.safetensors"
    script.write_text(RELOAD)
    command = [sys.executable, str(script), str(folder), str(out), str(Path(__file__).parent),
               str(sample_rounds), str(sample_seed)]
    subprocess.run(command, check=True, timeout=600)
    return load_file(out)
