"""Multi-round referring dialogues about one labelled image, planned from its structures' masks.

A round either names its target (or describes it so the image alone answers it) or refers to an
earlier round through a relation between masks (``relations``). A round is emitted as reference-only
(``names_target=False``) only when its relation is ambiguous without the reference; otherwise it names
its target. Side words follow the radiological convention for CT/MRI: the patient's left is on the
image's right (``patient_left_on_image_right``); ``sides="image"`` words every direction as seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mediround.data.build.relations import (
    SIZE_MARGIN,
    Resolve,
    Structure,
    ambiguous_without_reference,
    by_size,
    container,
    content,
    counterpart,
    nearest,
    touching,
    towards,
)
from mediround.data.synth.generator import NAMING_REFERENCE_FRACTION, RECENT_PHRASING_FRACTION
from mediround.data.synth.scenarios import (
    NAMED_QUERIES,
    NAMING_ANSWERS,
    OPENINGS,
    PLAIN_ANSWERS,
    RELATIONS,
    SCENARIOS,
)

SIDE_MODES = ("radiological", "image")
CROSS_SECTIONAL = ("CT", "MRI")
RECENT_REFERENCES = ("it", "that one", "this structure")
EXPLICIT_REFERENCES = ("the structure from round {r}", "the mask of round {r}", "what was segmented in round {r}")
REFERRING_QUERIES = (
    "Segment the {thing} {phrase}.",
    "Now find the {thing} {phrase}.",
    "Which {thing} is {phrase}? Segment it.",
    "Show me the {thing} {phrase}.",
)
NAMING_REFERRING_QUERY = "Segment the {name}, the {thing} {phrase}."
SIZE_QUERIES = {
    True: ("Segment the largest {noun}.", "Which {noun} is the biggest? Segment it."),
    False: ("Segment the smallest {noun}.", "Which {noun} is the smallest? Segment it."),
}
_SYNTH_OPENINGS = {opening.key: opening.queries for opening in OPENINGS}
FUNCTION_QUERIES = {
    "liver": _SYNTH_OPENINGS["bile"],
    "spleen": _SYNTH_OPENINGS["blood-cells"],
    "stomach": _SYNTH_OPENINGS["digestion"],
    "heart": _SYNTH_OPENINGS["pump"],
    "aorta": ("Segment the vessel that carries blood from the heart to the body.",),
    "pancreas": ("Segment the organ that produces insulin.",),
    "gallbladder": ("Segment the organ that stores and concentrates bile.",),
    "inferior vena cava": ("Segment the vein that returns blood from the lower body to the heart.",),
    "postcava": ("Segment the vein that returns blood from the lower body to the heart.",),
}
"""Openings a reader answers from anatomical knowledge (inferential reasoning), by structure noun."""
_SYNTH_RELATIONS = {relation.key: relation for relation in RELATIONS}


@dataclass(frozen=True)
class Link:
    """A way to refer to a target from an earlier round's structure. ``phrase`` holds ``{x}`` (how the
    source is referred to); ``thing`` is "noun" (the target's noun) or "kind" (structure/lesion).
    ``templates`` (from the synthetic benchmark's inferential relations) replace the generic wording."""

    key: str
    resolve: Resolve
    phrase: str
    thing: str = "kind"
    templates: str | None = None

    def scenario(self, source: Structure, target: Structure) -> str:
        if self.templates is not None:
            return "inferential-reasoning"
        if self.key in ("container", "content"):
            return "organ-lesion" if source.lesion != target.lesion else "anatomical-hierarchy"
        if self.key in ("larger", "smaller"):
            return "attribute-association"
        return "spatial-relationship"

    def admissible(self, target: Structure) -> Callable[[Structure], bool]:
        """Which structures a reader of the query could take it to mean (used by the ambiguity check)."""
        if self.thing == "noun":
            return lambda s: s.noun == target.noun
        return (lambda s: s.lesion) if target.lesion else (lambda s: True)


PAIRED_ORGANS = ("kidney", "lung", "adrenal gland", "ovary", "testis", "breast")
"""Paired organs where one takes over when the other fails (the inferential "compensate" wording)."""


def _restricted(resolve: Resolve, keep: Callable[[Structure, Structure], bool]) -> Resolve:
    """``resolve`` limited to (source, target) pairs ``keep`` accepts (a wording fits only those)."""

    def restricted(structures: list[Structure], source: int) -> int | None:
        target = resolve(structures, source)
        return target if target is not None and keep(structures[source], structures[target]) else None

    return restricted


SHAPE_LINKS = (
    Link("container", container, "that contains {x}"),
    Link("content", content, "inside {x}"),
    Link("counterpart", counterpart, "on the other side from {x}", thing="noun"),
    Link("larger", by_size(True), "larger than {x}", thing="noun"),
    Link("smaller", by_size(False), "smaller than {x}", thing="noun"),
    Link("nearest", nearest, "nearest to {x}"),
    Link("touching", touching, "touching {x}"),
    Link("compensate", _restricted(counterpart, lambda s, t: t.noun in PAIRED_ORGANS), "", templates="compensate"),
    Link("impaired-organ", _restricted(container, lambda s, t: s.lesion and not t.lesion), "", templates="impaired-organ"),
    Link("explain", _restricted(content, lambda s, t: t.lesion and not s.lesion), "", templates="explain"),
)


def direction_links(view: str | None, patient_left_on_image_right: bool | None) -> tuple[Link, ...]:
    """Left/right/above/below links worded for the image: patient sides when the orientation is known,
    anatomical directions for volume slices, image directions otherwise."""
    if view == "sagittal":
        horizontal = {"left": "in front of {x}", "right": "behind {x}"}
    elif patient_left_on_image_right is None:
        horizontal = {"left": "to the left of {x} in the image", "right": "to the right of {x} in the image"}
    else:
        patient = {True: "left", False: "right"}[patient_left_on_image_right]
        other = "right" if patient == "left" else "left"
        horizontal = {"right": f"on the patient's {patient} of {{x}}", "left": f"on the patient's {other} of {{x}}"}
    if view == "axial":
        vertical = {"up": "in front of {x}", "down": "behind {x}"}
    elif view is None:
        vertical = {"up": "above {x} in the image", "down": "below {x} in the image"}
    else:
        vertical = {"up": "above {x}", "down": "below {x}"}
    words = {**horizontal, **vertical}
    return tuple(Link(f"towards-{d}", towards(d), words[d]) for d in ("left", "right", "up", "down"))


def patient_orientation(structures: list[Structure], modality: str | None, sides: str) -> bool | None:
    """Whether the patient's left is on the image's right in a 2-D image: read from a left/right pair
    of labels when the image has one, else the radiological convention for CT/MRI, else unknown."""
    if sides == "image":
        return None
    for left in structures:
        if left.side != "left":
            continue
        for right in structures:
            if right.side == "right" and right.noun == left.noun:
                return bool(left.centre[1] > right.centre[1])
    return True if modality in CROSS_SECTIONAL else None


@dataclass
class PlannedRound:
    """A round before files are written: the index of its target structure and its wording."""

    target: int
    query: str
    answer: str
    ref: int | None
    names_target: bool
    depth: int
    scenario: str | None


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator of one image's dialogue: the same for a seed whatever else is built, in any order."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng(np.random.SeedSequence([seed, digest]))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


@dataclass
class _Move:
    link: Link
    source_round: int
    target: int
    ambiguous: bool
    scenario: str


class Planner:
    """Plans the dialogue of one image's structures (see ``plan``)."""

    def __init__(self, structures: list[Structure], links: tuple[Link, ...]):
        self.structures = structures
        self.links = links
        names = [s.name for s in structures]
        self.unique_names = {i for i, name in enumerate(names) if names.count(name) == 1}
        self._resolved: dict[tuple[str, int], int | None] = {}
        self._ambiguous: dict[tuple[str, int], bool] = {}

    def resolve(self, link: Link, source: int) -> int | None:
        """``link.resolve`` memoised: the ambiguity check applies every link to every structure."""
        key = (link.key, source)
        if key not in self._resolved:
            self._resolved[key] = link.resolve(self.structures, source)
        return self._resolved[key]

    def ambiguous(self, link: Link, source: int, target: int) -> bool:
        key = (link.key, source)
        if key not in self._ambiguous:
            self._ambiguous[key] = ambiguous_without_reference(
                lambda _, index: self.resolve(link, index),
                self.structures,
                source,
                link.admissible(self.structures[target]),
            )
        return self._ambiguous[key]

    def openings(self) -> list[tuple[str, int, tuple[str, ...]]]:
        """(scenario, target, queries) of the rounds the image alone answers, besides naming."""
        found = []
        nouns: dict[str, list[int]] = {}
        for index, structure in enumerate(self.structures):
            nouns.setdefault(structure.noun, []).append(index)
        for noun, members in nouns.items():
            if len(members) == 1 and noun in FUNCTION_QUERIES:
                found.append(("inferential-reasoning", members[0], FUNCTION_QUERIES[noun]))
            if len(members) >= 2:
                for largest in (True, False):
                    ranked = sorted(members, key=lambda i: self.structures[i].area, reverse=largest)
                    first, second = (self.structures[i].area for i in ranked[:2])
                    if (first >= SIZE_MARGIN * second) if largest else (second >= SIZE_MARGIN * first):
                        queries = tuple(q.format(noun=noun) for q in SIZE_QUERIES[largest])
                        found.append(("attribute-association", ranked[0], queries))
        return found

    def moves(self, planned: list[PlannedRound]) -> list[_Move]:
        used = {self.structures[p.target].key for p in planned}
        found = []
        for number, source in enumerate(planned):
            for link in self.links:
                target = self.resolve(link, source.target)
                if target is None or self.structures[target].key in used:
                    continue
                chosen = self.structures[target]
                ambiguous = self.ambiguous(link, source.target, target)
                if ambiguous or (target in self.unique_names and link.templates is None):
                    scenario = link.scenario(self.structures[source.target], chosen)
                    found.append(_Move(link, number, target, ambiguous, scenario))
        return found

    def plan(self, rng: np.random.Generator, min_rounds: int, max_rounds: int) -> tuple[str, list[PlannedRound]] | None:
        """(scenario, rounds) of one dialogue, or None when the image cannot host ``min_rounds`` rounds."""
        openings = self.openings()
        starts = [PlannedRound(i, "", "", None, True, 0, None) for i in sorted(self.unique_names)]
        reachable = {m.scenario for start in starts for m in self.moves([start]) if m.ambiguous}
        available = [s for s in SCENARIOS if s in reachable or any(o[0] == s for o in openings)]
        scenario = _pick(rng, available) if available else None
        count = int(rng.integers(min_rounds, max_rounds + 1))
        own_openings = [o for o in openings if o[0] == scenario]
        if own_openings and rng.random() < 0.6:
            planned = [self._described(rng, _pick(rng, own_openings))]
        else:
            sources = [s.target for s in starts if any(m.scenario == scenario for m in self.moves([s]))]
            candidates = sources or sorted(self.unique_names)
            if not candidates:
                return None
            planned = [self._named(rng, _pick(rng, candidates))]
        while len(planned) < count:
            moves = self.moves(planned)
            used = {self.structures[p.target].key for p in planned}
            unused = [i for i in sorted(self.unique_names) if self.structures[i].key not in used]
            if moves and (rng.random() < 0.75 or not unused):
                weights = np.array([self._weight(m, scenario, len(planned)) for m in moves])
                move = moves[int(rng.choice(len(moves), p=weights / weights.sum()))]
                planned.append(self._referring(rng, move, planned))
            elif unused:
                planned.append(self._named(rng, _pick(rng, unused)))
            else:
                break
        if len(planned) < min_rounds:
            return None
        return scenario or "spatial-relationship", planned

    @staticmethod
    def _weight(move: _Move, scenario: str | None, rounds: int) -> float:
        weight = 3.0 if move.scenario == scenario else 1.0
        weight *= 2.0 if move.source_round == rounds - 1 else 1.0
        return weight * (2.0 if move.ambiguous else 1.0)

    def _named(self, rng: np.random.Generator, target: int) -> PlannedRound:
        name = self.structures[target].name
        query = _pick(rng, NAMED_QUERIES).format(name=name)
        answer = _pick(rng, NAMING_ANSWERS + PLAIN_ANSWERS).format(name=name)
        return PlannedRound(target, query, answer, None, True, 0, None)

    def _described(self, rng: np.random.Generator, opening: tuple[str, int, tuple[str, ...]]) -> PlannedRound:
        scenario, target, queries = opening
        answer = _pick(rng, NAMING_ANSWERS + PLAIN_ANSWERS).format(name=self.structures[target].name)
        return PlannedRound(target, _pick(rng, queries), answer, None, True, 0, scenario)

    def _referring(self, rng: np.random.Generator, move: _Move, planned: list[PlannedRound]) -> PlannedRound:
        target = self.structures[move.target]
        number = move.source_round + 1
        recent = move.source_round == len(planned) - 1 and rng.random() < RECENT_PHRASING_FRACTION
        names = not move.ambiguous or rng.random() < NAMING_REFERENCE_FRACTION
        names = names and move.target in self.unique_names and move.link.templates is None
        if move.link.templates is not None:
            relation = _SYNTH_RELATIONS[move.link.templates]
            query = _pick(rng, relation.recent if recent else relation.explicit).format(r=number, noun=target.noun)
        else:
            reference = _pick(rng, RECENT_REFERENCES if recent else EXPLICIT_REFERENCES).format(r=number)
            thing = target.noun if move.link.thing == "noun" else ("lesion" if target.lesion else "structure")
            phrase = move.link.phrase.format(x=reference)
            template = NAMING_REFERRING_QUERY if names else _pick(rng, REFERRING_QUERIES)
            query = template.format(thing=thing, phrase=phrase, name=target.name)
        answer = _pick(rng, NAMING_ANSWERS if names else PLAIN_ANSWERS).format(name=target.name)
        depth = planned[move.source_round].depth + 1
        return PlannedRound(move.target, query, answer, number, names, depth, move.scenario)

