"""Small dialogue files and a tiny random MediRound for the inference tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 48


def rect(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_dialogues(root: Path, n_dialogues: int = 3, n_rounds: int = 3, seed: int = 0,
                    with_masks: bool = True, with_refs: bool = True, name: str = "data.jsonl") -> Path:
    """``n_dialogues`` dialogues of ``n_rounds`` rounds; round t > 1 refers to round t - 1 (``with_refs``)."""
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(n_dialogues):
        image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        write_png(root / "images" / f"d{index}.png", image)
        rounds = []
        for number in range(1, n_rounds + 1):
            top, left = rng.integers(0, SIZE // 2, 2)
            round_ = {"query": f"Segment structure {number} of image {index}.", "answer": "It is [SEG]."}
            if with_masks:
                mask = rect(int(top), int(left), int(top) + 12, int(left) + 16)
                write_png(root / "masks" / f"d{index}_r{number}.png", np.where(mask, 255, 0).astype(np.uint8))
                round_["mask"] = f"masks/d{index}_r{number}.png"
            if number > 1 and with_refs:
                round_["ref"] = number - 1
                round_["query"] = f"Segment the structure next to the one of round {number - 1}."
            rounds.append(round_)
        lines.append({"id": f"dlg-{index}", "image": f"images/d{index}.png", "modality": "CT", "rounds": rounds})
    path = root / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def tiny_model(jcm_trained: bool = True):
    """A random tiny MediRound in eval mode (one CPU thread keeps results reproducible and cheap).

    ``jcm_trained`` marks the JCM weights as trained in the config (as ``train-jcm`` does), so that
    numeric thresholds are accepted; the weights stay random, the refine MLP's last layer included (it is
    built as zeros, an identity refine), so refined masks differ from raw ones.
    """
    import torch

    from mediround.model import build_model, preset

    torch.set_num_threads(1)
    model = build_model(preset("tiny")).eval()
    model.config.trainable.jcm = jcm_trained
    last = model.jcm.refine_mlp[-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(5))
        last.bias.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(6))
    return model


def set_judge_score(model, score: float) -> None:
    """Make the JCM judge output ``score`` for every feature: last layer weights 0, bias logit(score)."""
    import math

    import torch

    last = model.jcm.judge_mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(score / (1 - score)))
