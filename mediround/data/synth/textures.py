"""Render a scene as an 8-bit greyscale slice in the look of one imaging modality.

Each tissue has a mean intensity and a texture per modality; tissues that are different entity
types are kept far apart in intensity so a small model can tell them apart.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mediround.data.synth.anatomy import Scene

MODALITIES = {"abdomen": ("CT", "MRI", "ultrasound"), "thorax": ("CT", "MRI", "X-ray")}

# tissue: (mean intensity, low-frequency mottling, fine grain), per modality.
APPEARANCE: dict[str, dict[str, tuple[float, float, float]]] = {
    "CT": {
        "background": (4, 0, 2),
        "fat": (85, 4, 5),
        "soft": (112, 5, 5),
        "bone": (245, 4, 4),
        "liver": (152, 5, 4),
        "spleen": (128, 4, 4),
        "stomach": (62, 10, 6),
        "kidney": (185, 4, 4),
        "lung": (24, 6, 6),
        "heart": (138, 4, 4),
        "fissure": (90, 0, 2),
        "tumour": (215, 18, 6),
        "core": (96, 6, 6),
        "cyst": (48, 1, 2),
    },
    "MRI": {
        "background": (2, 0, 1),
        "fat": (205, 8, 5),
        "soft": (92, 6, 5),
        "bone": (40, 4, 4),
        "liver": (70, 5, 3),
        "spleen": (132, 5, 3),
        "stomach": (175, 12, 5),
        "kidney": (158, 6, 3),
        "lung": (12, 3, 3),
        "heart": (55, 5, 3),
        "fissure": (120, 0, 2),
        "tumour": (200, 20, 5),
        "core": (105, 6, 5),
        "cyst": (250, 1, 1),
    },
    "ultrasound": {
        "background": (0, 0, 0),
        "fat": (105, 8, 6),
        "soft": (70, 8, 6),
        "bone": (235, 4, 6),
        "liver": (128, 6, 5),
        "spleen": (150, 6, 5),
        "stomach": (40, 8, 6),
        "kidney": (92, 6, 5),
        "lung": (200, 10, 8),
        "heart": (60, 6, 5),
        "fissure": (100, 0, 2),
        "tumour": (205, 16, 6),
        "core": (100, 8, 6),
        "cyst": (10, 1, 1),
    },
    "X-ray": {
        "background": (10, 0, 2),
        "fat": (105, 3, 3),
        "soft": (122, 3, 3),
        "bone": (235, 3, 3),
        "liver": (150, 3, 3),
        "spleen": (140, 3, 3),
        "stomach": (70, 3, 3),
        "kidney": (140, 3, 3),
        "lung": (38, 8, 4),
        "heart": (178, 3, 3),
        "fissure": (95, 0, 2),
        "tumour": (212, 10, 4),
        "core": (150, 5, 4),
        "cyst": (115, 1, 2),
    },
}


def render(scene: Scene, modality: str, rng: np.random.Generator) -> np.ndarray:
    """The scene as a (size, size) uint8 image in ``modality``'s look."""
    table = APPEARANCE[modality]
    size = scene.size
    layers = [("fat", scene.body), ("soft", scene.soft_tissue), ("bone", scene.bone)]
    for entity in scene.entities.values():
        layers.append((entity.tissue, entity.mask))
    layers.append(("fissure", scene.fissures))
    mean = np.full((size, size), table["background"][0], np.float32)
    mottle = np.zeros((size, size), np.float32)
    grain = np.zeros((size, size), np.float32)
    for tissue, mask in layers:
        level, mottle_amplitude, grain_amplitude = table[tissue]
        mean[mask] = level + rng.uniform(-8, 8)
        mottle[mask] = mottle_amplitude
        grain[mask] = grain_amplitude
    image = mean + mottle * _smooth_noise(rng, size, 6) + grain * rng.standard_normal((size, size))
    image = _modality_effects(image, modality, rng)
    image = image * rng.uniform(0.92, 1.06) + rng.uniform(-6, 6)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance noise that varies over about size/cells pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (Pillow cannot blur float images)."""
    reach = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-reach, reach + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        padded = np.pad(image, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(taps))
    return image.astype(np.float32)


def _modality_effects(image: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    if modality == "CT":
        return _blur(image, 0.6)
    if modality == "MRI":
        bias = 1.0 + 0.08 * _smooth_noise(rng, size, 3)
        return _blur(image, 0.7) * bias
    if modality == "ultrasound":
        speckle = _blur(rng.rayleigh(1.0, (size, size)).astype(np.float32), 0.7) / np.sqrt(np.pi / 2)
        depth = np.linspace(1.1, 0.8, size, dtype=np.float32)[:, None]
        return _blur(image, 0.8) * speckle * depth
    ramp = np.linspace(0.95, 1.05, size, dtype=np.float32)[None, :]
    return _blur(image, 1.2) * ramp
