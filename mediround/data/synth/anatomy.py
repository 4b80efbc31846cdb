"""Random anatomy-like scenes: a body outline, named organs, lobes, lesions and tumour cores.

Layouts are fixed per region with random jitter, so every entity type sits in a consistent place
and has a consistent size. Images follow the radiological convention: the patient's right is on the
image's left. Coordinates are normalised (0..1), so any image size draws the same scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mediround.data.synth.shapes import Blob, random_blob, split_by_line

REGIONS = ("abdomen", "thorax")
LESION_KINDS = ("tumour", "cyst")
MIN_MASK_FRACTION = 0.004


@dataclass
class Entity:
    """One segmentable instance. ``name`` is unique within a scene and is what rounds call it."""

    name: str
    kind: str
    noun: str
    tissue: str
    mask: np.ndarray
    side: str | None = None
    parent: str | None = None
    level: str | None = None
    partner: str | None = None


@dataclass
class Scene:
    """Everything drawn in one image: tissue layers for rendering and the named entities."""

    region: str
    size: int
    body: np.ndarray
    soft_tissue: np.ndarray
    bone: np.ndarray
    fissures: np.ndarray
    entities: dict[str, Entity] = field(default_factory=dict)

    def of_kind(self, *kinds: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind in kinds]

    def children(self, parent: str, *kinds: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.parent == parent and e.kind in kinds]


ABDOMEN_ORGANS = (
    ("liver", None, "liver", (0.30, 0.33), (0.21, 0.155), 0.25),
    ("spleen", None, "spleen", (0.74, 0.31), (0.135, 0.11), -0.3),
    ("stomach", None, "stomach", (0.53, 0.47), (0.085, 0.095), 0.0),
    ("right kidney", "right", "kidney", (0.29, 0.68), (0.125, 0.155), 0.35),
    ("left kidney", "left", "kidney", (0.71, 0.68), (0.125, 0.155), -0.35),
)
THORAX_ORGANS = (
    ("heart", None, "heart", (0.57, 0.57), (0.145, 0.125), 0.3),
    ("right lung", "right", "lung", (0.28, 0.46), (0.165, 0.275), 0.05),
    ("left lung", "left", "lung", (0.72, 0.46), (0.155, 0.265), -0.05),
)
LESION_HOSTS = {
    "abdomen": ("liver", "spleen", "right kidney", "left kidney"),
    "thorax": ("right lung", "left lung"),
}
PARTNERS = {
    "right kidney": "left kidney",
    "left kidney": "right kidney",
    "right lung": "left lung",
    "left lung": "right lung",
}


def sample_scene(rng: np.random.Generator, size: int, region: str | None = None) -> Scene:
    """A random scene of ``region`` (random when None) at ``size`` x ``size`` pixels."""
    region = region or REGIONS[int(rng.integers(len(REGIONS)))]
    body_blob = random_blob(rng, (0.5, 0.5), (0.47, 0.40), jitter=0.01, scale=(0.96, 1.02), wobble=0.02)
    body = body_blob.mask(size)
    inner = Blob(
        body_blob.cx, body_blob.cy, body_blob.rx * 0.92, body_blob.ry * 0.9, body_blob.angle, body_blob.wobble
    ).mask(size)
    spine_y = 0.79 if region == "abdomen" else 0.83
    bone = random_blob(rng, (0.5, spine_y), (0.06, 0.055), jitter=0.01, wobble=0.03).mask(size)
    scene = Scene(region, size, body, inner, bone, np.zeros((size, size), bool))
    taken = bone.copy()
    blobs: dict[str, Blob] = {}
    for name, side, noun, centre, radii, angle in ABDOMEN_ORGANS if region == "abdomen" else THORAX_ORGANS:
        blob = random_blob(rng, centre, radii, angle=angle)
        mask = blob.mask(size) & inner & ~taken
        taken |= mask
        blobs[name] = blob
        scene.entities[name] = Entity(name, "organ", noun, noun, mask, side=side, partner=PARTNERS.get(name))
    if region == "thorax":
        _add_lobes(rng, scene, blobs)
    _add_lesions(rng, scene, blobs)
    return scene


def _add_lobes(rng: np.random.Generator, scene: Scene, blobs: dict[str, Blob]) -> None:
    for side in ("right", "left"):
        lung = scene.entities[f"{side} lung"]
        blob = blobs[lung.name]
        slope = rng.uniform(0.25, 0.6) * (1 if side == "right" else -1)
        upper, lower = split_by_line(lung.mask, (blob.cx, blob.cy + rng.uniform(-0.04, 0.04)), slope)
        shifted = np.zeros_like(upper)
        shifted[1:] = upper[:-1]
        scene.fissures |= shifted & lower
        for level, part in (("upper", upper), ("lower", lower)):
            name = f"{side} {level} lobe"
            scene.entities[name] = Entity(
                name, "part", "lobe", "lung", part, side=side, parent=lung.name, level=level
            )


def _add_lesions(rng: np.random.Generator, scene: Scene, blobs: dict[str, Blob]) -> None:
    hosts = list(LESION_HOSTS[scene.region])
    count = int(rng.integers(1, len(hosts) + 1 if scene.region == "abdomen" else 3))
    for host_index in sorted(rng.choice(len(hosts), size=min(count, 3), replace=False)):
        host = scene.entities[hosts[host_index]]
        host_blob = blobs[host.name]
        kind = LESION_KINDS[int(rng.integers(2))]
        minor = min(host_blob.rx, host_blob.ry)
        radius = min(rng.uniform(0.085, 0.11), 0.65 * minor)
        reach = 1.0 - radius / minor
        offset = rng.uniform(0.0, 0.45 * reach, size=2) * rng.choice([-1.0, 1.0], size=2)
        cos, sin = np.cos(host_blob.angle), np.sin(host_blob.angle)
        u, v = offset[0] * host_blob.rx, offset[1] * host_blob.ry
        centre = (host_blob.cx + u * cos - v * sin, host_blob.cy + u * sin + v * cos)
        wobble = 0.03 if kind == "cyst" else 0.12
        lesion_blob = random_blob(
            rng,
            centre,
            (radius, radius * rng.uniform(0.8, 1.0)),
            jitter=0.0,
            scale=(1.0, 1.0),
            angle=rng.uniform(0, np.pi),
            wobble=wobble,
        )
        name = f"{host.name} {kind}"
        mask = lesion_blob.mask(scene.size) & host.mask
        scene.entities[name] = Entity(name, "lesion", kind, kind, mask, side=host.side, parent=host.name)
        if kind == "tumour":
            core_blob = random_blob(
                rng,
                centre,
                (lesion_blob.rx * 0.7, lesion_blob.ry * 0.7),
                jitter=0.006,
                scale=(0.95, 1.05),
                angle=rng.uniform(0, np.pi),
                wobble=0.08,
            )
            core = f"{name} core"
            scene.entities[core] = Entity(
                core, "core", "core", "core", core_blob.mask(scene.size) & mask, side=host.side, parent=name
            )


def well_formed(scene: Scene) -> bool:
    """True when every entity covers at least ``MIN_MASK_FRACTION`` of the image."""
    least = MIN_MASK_FRACTION * scene.size * scene.size
    return all(int(e.mask.sum()) >= max(least, 4) for e in scene.entities.values())


def entity_names() -> list[str]:
    """Every entity name a scene can contain, in a fixed order."""
    names = [organ[0] for organ in ABDOMEN_ORGANS + THORAX_ORGANS]
    names += [f"{side} {level} lobe" for side in ("right", "left") for level in ("upper", "lower")]
    for hosts in LESION_HOSTS.values():
        for host in hosts:
            names += [f"{host} cyst", f"{host} tumour", f"{host} tumour core"]
    return names
