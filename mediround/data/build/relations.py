"""Relations between the labelled structures of one image, computed from their masks alone.

A relation maps a source structure (an earlier round's target) to at most one target structure, or to
none when the masks do not single one out. Directions are image directions here; ``dialogues`` turns
them into the patient's sides when the image's orientation is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

LESION_WORDS = ("tumor", "tumour", "lesion", "nodule", "cyst", "cancer", "infection", "polyp", "mass",
                "metasta", "carcinoma", "edema", "necro", "enhancing", "neoplastic", "haemorrhage",
                "hemorrhage", "stone", "fracture")
SIDES = ("left", "right")
CONTAINED_FRACTION = 0.95
"""A structure is inside another when this share of its pixels is."""
SIZE_MARGIN = 1.25
"""Larger/smaller and clearest-nearest choices need this ratio between the winner and the runner-up."""
OVERLAP_LIMIT = 0.05
"""Structures overlapping more than this share of the smaller one are not 'beside' each other."""
WHOLE_MARGIN = 1.1
"""A container must be at least this much larger than what it contains (equal masks are not nested)."""
SAMPLED_POINTS = 256


@dataclass
class Structure:
    """One labelled mask of an image. ``name`` is the display name ("left kidney"), ``noun`` the same
    without its side ("kidney"), ``side`` "left"/"right" as the label says (the patient's side)."""

    name: str
    mask: np.ndarray

    @cached_property
    def side(self) -> str | None:
        found = [word for word in self.name.split() if word in SIDES]
        return found[0] if len(found) == 1 else None

    @cached_property
    def noun(self) -> str:
        return " ".join(word for word in self.name.split() if word not in SIDES)

    @cached_property
    def lesion(self) -> bool:
        return any(word in self.name.lower() for word in LESION_WORDS)

    @cached_property
    def area(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def centre(self) -> np.ndarray:
        rows, columns = np.nonzero(self.mask)
        return np.array([rows.mean(), columns.mean()])

    @cached_property
    def bounds(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom and right exclusive."""
        rows, columns = np.nonzero(self.mask)
        return int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1

    @cached_property
    def points(self) -> np.ndarray:
        """Up to ``SAMPLED_POINTS`` evenly spaced foreground coordinates, for distances between masks."""
        coordinates = np.argwhere(self.mask)
        stride = max(1, len(coordinates) // SAMPLED_POINTS)
        return coordinates[::stride].astype(np.float64)

    @cached_property
    def grown(self) -> np.ndarray:
        """The mask dilated by two pixels (4-neighbourhood, twice): what touches it overlaps this."""
        grown = self.mask.copy()
        for _ in range(2):
            step = grown.copy()
            step[1:] |= grown[:-1]
            step[:-1] |= grown[1:]
            step[:, 1:] |= grown[:, :-1]
            step[:, :-1] |= grown[:, 1:]
            grown = step
        return grown

    @cached_property
    def key(self) -> bytes:
        """Identical masks (a label that equals another) share this key: they are one target."""
        return np.packbits(self.mask).tobytes()


def display_name(label: str) -> str:
    """``autochthon_left`` -> ``left autochthon``; ``COVID-19+infection`` -> ``COVID-19 infection``."""
    words = re.split(r"[_+\s]+", label.strip())
    sides = [w for w in words if w.lower() in SIDES]
    rest = [w for w in words if w.lower() not in SIDES]
    return " ".join([s.lower() for s in sides[:1]] + rest).strip()


def overlap(a: Structure, b: Structure) -> int:
    """Shared pixels, counted only where the bounding boxes meet (most pairs do not)."""
    top, left = max(a.bounds[0], b.bounds[0]), max(a.bounds[1], b.bounds[1])
    bottom, right = min(a.bounds[2], b.bounds[2]), min(a.bounds[3], b.bounds[3])
    if top >= bottom or left >= right:
        return 0
    window = (slice(top, bottom), slice(left, right))
    return int(np.count_nonzero(a.mask[window] & b.mask[window]))


def inside(inner: Structure, outer: Structure) -> bool:
    """``inner`` lies within ``outer`` and is clearly smaller (a part, a lesion in its organ)."""
    return outer.area >= WHOLE_MARGIN * inner.area and overlap(inner, outer) >= CONTAINED_FRACTION * inner.area


def apart(a: Structure, b: Structure) -> bool:
    """Neither overlaps the other by more than ``OVERLAP_LIMIT`` of the smaller."""
    return overlap(a, b) <= OVERLAP_LIMIT * min(a.area, b.area)


def distance(a: Structure, b: Structure) -> float:
    """Smallest distance in pixels between sampled points of the two masks."""
    gaps = a.points[:, None, :] - b.points[None, :, :]
    return float(np.sqrt((gaps**2).sum(-1)).min())


def _clear_winner(scored: list[tuple[float, int]]) -> int | None:
    """The index with the smallest score when it beats the runner-up by ``SIZE_MARGIN``."""
    if not scored:
        return None
    scored.sort()
    if len(scored) > 1 and scored[1][0] < SIZE_MARGIN * scored[0][0] + 1.0:
        return None
    return scored[0][1]


Resolve = Callable[[list[Structure], int], "int | None"]


def towards(direction: str) -> Resolve:
    """The nearest separate structure in an image direction (``left``/``right``/``up``/``down``): its
    centre lies mostly that way, and it is clearly nearer than the next one that way."""
    axis, sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}[direction]

    def resolve(structures: list[Structure], source: int) -> int | None:
        origin = structures[source]
        scored = []
        for index, other in enumerate(structures):
            if index == source or not apart(origin, other):
                continue
            offset = other.centre - origin.centre
            if sign * offset[axis] > abs(offset[1 - axis]):
                scored.append((float(np.hypot(*offset)), index))
        return _clear_winner(scored)

    return resolve


def container(structures: list[Structure], source: int) -> int | None:
    """The smallest structure that contains the source (its organ, its whole)."""
    origin = structures[source]
    holders = [(s.area, i) for i, s in enumerate(structures) if i != source and inside(origin, s)]
    holders.sort()
    if len(holders) > 1 and holders[1][0] == holders[0][0]:
        return None
    return holders[0][1] if holders else None


def content(structures: list[Structure], source: int) -> int | None:
    """The one outermost structure inside the source (its lesion, its part), if exactly one."""
    origin = structures[source]
    inner = [i for i, s in enumerate(structures) if i != source and inside(s, origin)]
    outermost = [i for i in inner if not any(j != i and inside(structures[i], structures[j]) for j in inner)]
    return outermost[0] if len(outermost) == 1 else None


def counterpart(structures: list[Structure], source: int) -> int | None:
    """The other one of a left/right pair named by the labels (left kidney -> right kidney)."""
    origin = structures[source]
    if origin.side is None:
        return None
    other_side = "right" if origin.side == "left" else "left"
    found = [i for i, s in enumerate(structures) if s.noun == origin.noun and s.side == other_side]
    return found[0] if len(found) == 1 else None


def by_size(larger: bool) -> Resolve:
    """The one structure of the same noun that is clearly larger (smaller) than the source."""

    def resolve(structures: list[Structure], source: int) -> int | None:
        origin = structures[source]
        found = [
            i
            for i, s in enumerate(structures)
            if i != source
            and s.noun == origin.noun
            and (s.area >= SIZE_MARGIN * origin.area if larger else origin.area >= SIZE_MARGIN * s.area)
        ]
        return found[0] if len(found) == 1 else None

    return resolve


def nearest(structures: list[Structure], source: int) -> int | None:
    """The separate structure whose mask comes closest to the source's, clearly closer than the next."""
    origin = structures[source]
    scored = [
        (distance(origin, s), i)
        for i, s in enumerate(structures)
        if i != source and apart(origin, s) and not inside(s, origin) and not inside(origin, s)
    ]
    return _clear_winner(scored)


def touching(structures: list[Structure], source: int) -> int | None:
    """The one separate structure whose mask touches the source's (within two pixels)."""
    origin = structures[source]
    found = [
        i
        for i, s in enumerate(structures)
        if i != source and apart(origin, s) and np.any(origin.grown & s.mask)
    ]
    return found[0] if len(found) == 1 else None


def ambiguous_without_reference(
    resolve: Resolve,
    structures: list[Structure],
    source: int,
    admissible: Callable[[Structure], bool] = lambda structure: True,
) -> bool:
    """True when the relation, applied to some other structure, picks a different mask than from
    ``source``: only then does a query using it need the referenced round to be answered.
    ``admissible`` says which structures the query's words allow ("the lesion ...": only lesions)."""
    target = resolve(structures, source)
    if target is None:
        return False
    for other in range(len(structures)):
        if other == source:
            continue
        reached = resolve(structures, other)
        if reached is None or not admissible(structures[reached]):
            continue
        if structures[reached].key != structures[target].key:
            return True
    return False
