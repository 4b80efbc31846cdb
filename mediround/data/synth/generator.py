"""Synthetic multi-round dialogues: scene -> rounds -> image, masks and ``Dialogue``; and writing a set.

Every dialogue is seeded from (seed, split, index), so a dialogue never depends on how many others
are generated, and splits never depend on each other.
"""

from __future__ import annotations

import functools
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mediround.atomic import atomic_path
from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats.jsonl import write_jsonl
from mediround.data.images import save_mask
from mediround.data.synth.anatomy import Entity, Scene, sample_scene, well_formed
from mediround.data.synth.scenarios import (
    NAMED_QUERIES,
    NAMING_ANSWERS,
    OPENINGS,
    PLAIN_ANSWERS,
    RELATIONS,
    SCENARIOS,
    Relation,
)
from mediround.data.synth.textures import MODALITIES, render
from mediround.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
HARD_FRACTION = 0.4
HARD_MIN_ROUNDS = 5
MAX_ROUNDS = 8
NAMING_REFERENCE_FRACTION = 0.2
NAMING_DESCRIPTION_FRACTION = 0.5
RECENT_PHRASING_FRACTION = 0.6
MAX_ATTEMPTS = 200
MIN_IMAGE_SIZE = 32
ANSWER_STYLES = ("mr-medseg", "named")
PHRASINGS = ("all", "a", "b")
KNOWLEDGE_SCENES = 1000


@dataclass(frozen=True)
class Wording:
    """How a set is worded.

    ``answers``: ``"mr-medseg"`` (default) answers never name the target ("It is [SEG].", as MR-MedSeg's
    "It is [REF-DECODE:...][MASK-DECODE:...]."), and a reference-only round is only planned when no text
    of the dialogue determines its entity (``PlannedRound.text_candidates``); ``"named"`` is the first benchmark's
    style, where some answers name the target and references may be resolvable from the text.
    ``phrasings``: ``"all"`` templates, or one half of every template list (``"a"``: even positions,
    ``"b"``: odd), so a model trained on one half can be evaluated on wordings it never saw. The random
    draws do not depend on ``phrasings``: the same seed gives the same scenes, targets and references in
    every half, worded differently.
    """

    answers: str = "mr-medseg"
    phrasings: str = "all"

    def __post_init__(self) -> None:
        if self.answers not in ANSWER_STYLES:
            raise ValueError(f"answers must be one of {', '.join(ANSWER_STYLES)}, not {self.answers!r}")
        if self.phrasings not in PHRASINGS:
            raise ValueError(f"phrasings must be one of {', '.join(PHRASINGS)}, not {self.phrasings!r}")

    def choose(self, rng: np.random.Generator, templates: Sequence[str]) -> str:
        """One template; the draw is over the whole list, so every half consumes the same random numbers."""
        index = int(rng.integers(len(templates)))
        if self.phrasings == "all":
            return templates[index]
        half = templates[PHRASINGS.index(self.phrasings) - 1 :: 2]
        return half[index % len(half)]

    @property
    def names_in_answers(self) -> bool:
        return self.answers == "named"


@dataclass
class PlannedRound:
    """A round before rendering: its target, wording, reference (1-based) and the relation it used.

    ``text_candidates``: the entities a reader of the dialogue's text up to this round (but not of the
    image) could take the target to be; one entity means the text alone resolves the round.
    """

    target: Entity
    query: str
    answer: str
    ref: int | None
    names_target: bool
    depth: int
    relation: str | None = None
    text_candidates: frozenset[str] = frozenset()


@dataclass
class SyntheticDialogue:
    """One generated dialogue with its pixels and scene, before anything is written."""

    dialogue: Dialogue
    image: np.ndarray
    masks: list[np.ndarray]
    scene: Scene
    planned: list[PlannedRound]


@dataclass
class SynthSummary:
    """Counts over a generated set, for the CLI's table and for tests."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    dialogues: Counter = field(default_factory=Counter)
    rounds: int = 0
    reference_only_rounds: int = 0
    text_resolvable_reference_only_rounds: int = 0
    scenarios: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    difficulties: Counter = field(default_factory=Counter)
    mask_fractions: list[float] = field(default_factory=list)

    def add(self, split: str, item: SyntheticDialogue) -> None:
        dialogue = item.dialogue
        self.dialogues[split] += 1
        self.rounds += len(dialogue.rounds)
        self.reference_only_rounds += sum(1 for r in dialogue.rounds if not r.names_target)
        self.text_resolvable_reference_only_rounds += sum(
            1
            for r, planned in zip(dialogue.rounds, item.planned)
            if not r.names_target and len(planned.text_candidates) == 1
        )
        self.scenarios[dialogue.scenario] += 1
        self.modalities[dialogue.modality] += 1
        self.difficulties[dialogue.difficulty] += 1
        self.mask_fractions.extend(float(mask.mean()) for mask in item.masks)

    @property
    def median_mask_fraction(self) -> float:
        return float(np.median(self.mask_fractions)) if self.mask_fractions else 0.0


def split_sizes(n_dialogues: int) -> dict[str, int]:
    """80/10/10 split of ``n_dialogues``; the remainder goes to train."""
    val = int(n_dialogues * SPLIT_FRACTIONS[1])
    test = int(n_dialogues * SPLIT_FRACTIONS[2])
    return {"train": n_dialogues - val - test, "val": val, "test": test}


def dialogue_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def make_dialogue(
    seed: int, split: str, index: int, image_size: int = 128, wording: Wording = Wording()
) -> SyntheticDialogue:
    """The ``index``-th dialogue of ``split`` for ``seed``, in memory."""
    rng = dialogue_rng(seed, split, index)
    scenario = SCENARIOS[index % len(SCENARIOS)]
    hard = bool(rng.random() < HARD_FRACTION)
    for _ in range(MAX_ATTEMPTS):
        scene = sample_scene(rng, image_size)
        if not well_formed(scene):
            continue
        planned = plan_rounds(rng, scene, scenario, hard, wording)
        if planned is not None:
            break
    else:
        raise RuntimeError(
            f"no {scenario} dialogue found in {MAX_ATTEMPTS} scenes (seed {seed}, index {index})"
        )
    modality = MODALITIES[scene.region][int(rng.integers(len(MODALITIES[scene.region])))]
    image = render(scene, modality, rng)
    dialogue_id = f"synth-{split}-{index:05d}"
    rounds = [
        Round(
            query=p.query,
            answer=p.answer,
            mask=f"masks/{dialogue_id}_r{number}.png",
            ref=p.ref,
            entity=p.target.name,
            difficulty="hard" if p.depth >= 2 else "regular",
            names_target=p.names_target,
        )
        for number, p in enumerate(planned, start=1)
    ]
    dialogue = Dialogue(
        id=dialogue_id,
        image=f"images/{dialogue_id}.png",
        rounds=rounds,
        modality=modality,
        scenario=scenario,
        difficulty=difficulty_of(planned),
        source="synthetic",
        item=index,
    )
    return SyntheticDialogue(dialogue, image, [p.target.mask for p in planned], scene, planned)


def difficulty_of(planned: list[PlannedRound]) -> str:
    """Hard: at least ``HARD_MIN_ROUNDS`` rounds, or a reference to a round that itself has a reference."""
    deep_chain = any(p.depth >= 2 for p in planned)
    return "hard" if len(planned) >= HARD_MIN_ROUNDS or deep_chain else "regular"


def plan_rounds(
    rng: np.random.Generator, scene: Scene, scenario: str, hard: bool, wording: Wording = Wording()
) -> list[PlannedRound] | None:
    """Rounds of one ``scenario`` dialogue on ``scene``, or None when this scene cannot host one."""
    if hard:
        count = (
            int(rng.integers(HARD_MIN_ROUNDS, MAX_ROUNDS + 1))
            if rng.random() < 0.7
            else int(rng.integers(3, 5))
        )
    else:
        count = int(rng.integers(2, HARD_MIN_ROUNDS))
    own = [r for r in RELATIONS if r.scenario == scenario and len(r.blind_targets(scene)) >= 2]
    firsts = [e for e in scene.entities.values() if any(r.resolve(scene, e) is not None for r in own)]
    if not firsts:
        return None
    first = _opening_round(rng, scene, scenario, firsts, wording)
    second = _reference_moves(scene, [first], own, scenario, False, wording)
    if not second:
        return None
    planned = [first, _phrase_reference(rng, second[int(rng.integers(len(second)))][1:], [first], wording)]
    usable = [r for r in RELATIONS if len(r.blind_targets(scene)) >= 2]
    while len(planned) < count:
        moves = _reference_moves(scene, planned, usable, scenario, hard, wording)
        unused = [e for e in scene.entities.values() if e.name not in {p.target.name for p in planned}]
        if moves and (rng.random() < 0.75 or not unused):
            weights = np.array([m[0] for m in moves], float)
            choice = moves[int(rng.choice(len(moves), p=weights / weights.sum()))]
            planned.append(_phrase_reference(rng, choice[1:], planned, wording))
        elif unused:
            planned.append(_opening_round(rng, scene, None, unused, wording))
        else:
            return None
    if hard and difficulty_of(planned) != "hard":
        return None
    return planned


def _opening_round(
    rng: np.random.Generator, scene: Scene, scenario: str | None, targets: list[Entity], wording: Wording
) -> PlannedRound:
    """A round that needs no reference: a scenario description when one fits, else the target's name.

    It counts as ``names_target`` even when a description is answered without the name: it is solvable
    without the history. Later rounds that refer to such a round can only use its mask.
    """
    names = {e.name for e in targets}
    described = [
        o
        for o in OPENINGS
        if (scenario is None or o.scenario == scenario) and (e := o.pick(scene)) and e.name in names
    ]
    if scenario is not None and not wording.names_in_answers:
        # A first round the text alone resolves (a name, "the organ below the liver") leaves most
        # references to it resolvable from the text too: prefer a description that needs the image,
        # borrowed from another scenario when this one has none.
        vague = text_knowledge().vague_openings
        described = [o for o in described if o.key in vague] or [
            o for o in OPENINGS if o.key in vague and (e := o.pick(scene)) and e.name in names
        ]
    if described and rng.random() < 0.6:
        opening = described[int(rng.integers(len(described)))]
        target = opening.pick(scene)
        query = wording.choose(rng, opening.queries)
        naming = bool(rng.random() < NAMING_DESCRIPTION_FRACTION) and wording.names_in_answers
        answer = wording.choose(rng, NAMING_ANSWERS if naming else PLAIN_ANSWERS).format(name=target.name)
        candidates = {target.name} | (set() if naming else text_knowledge().openings[opening.key])
    else:
        target = targets[int(rng.integers(len(targets)))]
        query = wording.choose(rng, NAMED_QUERIES).format(name=target.name)
        answers = NAMING_ANSWERS + PLAIN_ANSWERS if wording.names_in_answers else PLAIN_ANSWERS
        answer = wording.choose(rng, answers).format(name=target.name)
        candidates = {target.name}
    return PlannedRound(target, query, answer, None, True, 0, None, frozenset(candidates))


def _reference_moves(
    scene: Scene,
    planned: list[PlannedRound],
    relations: list[Relation],
    scenario: str,
    allow_chains: bool,
    wording: Wording,
) -> list[tuple[float, Relation, int, Entity]]:
    """(weight, relation, 0-based source round, target) for every reference that reaches a new entity.

    In the MR-MedSeg style a move whose target the dialogue's text alone would determine is left out:
    such a round would not need the referenced mask.
    """
    used = {p.target.name for p in planned}
    moves = []
    for index, source in enumerate(planned):
        if source.ref is not None and not allow_chains:
            continue
        for relation in relations:
            target = relation.resolve(scene, source.target)
            if target is None or target.name in used:
                continue
            if not wording.names_in_answers and _reference_candidates(relation, source, planned) <= {target.name}:
                continue
            weight = (3.0 if relation.scenario == scenario else 1.0) * (
                2.0 if index == len(planned) - 1 else 1.0
            )
            weight *= 2.0 if source.ref is not None else 1.0
            moves.append((weight, relation, index, target))
    return moves


def _phrase_reference(
    rng: np.random.Generator, move: tuple[Relation, int, Entity], planned: list[PlannedRound], wording: Wording
) -> PlannedRound:
    relation, source_index, target = move
    recent = source_index == len(planned) - 1 and rng.random() < RECENT_PHRASING_FRACTION
    templates = relation.recent if recent else relation.explicit
    query = wording.choose(rng, templates).format(r=source_index + 1, noun=target.noun)
    names_target = bool(rng.random() < NAMING_REFERENCE_FRACTION) and wording.names_in_answers
    answer = wording.choose(rng, NAMING_ANSWERS if names_target else PLAIN_ANSWERS).format(name=target.name)
    source = planned[source_index]
    candidates = {target.name} | (set() if names_target else _reference_candidates(relation, source, planned))
    return PlannedRound(
        target, query, answer, source_index + 1, names_target, source.depth + 1, relation.key, frozenset(candidates)
    )


@dataclass(frozen=True)
class TextKnowledge:
    """What a reader of the text alone can know: which entities each opening description and each
    relation (from a given source entity) can lead to, over many scenes."""

    openings: dict[str, frozenset[str]]
    relations: dict[str, dict[str, frozenset[str]]]

    @functools.cached_property
    def vague_openings(self) -> frozenset[str]:
        """Keys of the descriptions that can pick more than one entity: only the image resolves them."""
        return frozenset(key for key, names in self.openings.items() if len(names) >= 2)


@functools.cache
def text_knowledge() -> TextKnowledge:
    """Collected from ``KNOWLEDGE_SCENES`` fixed-seed 64-pixel scenes (about 2 s, once per process).

    Every (opening or relation, source, target) triple the generator can produce appears within the
    first 1,000 (the count stops growing after about 700); one missed would only make a candidate set
    smaller, so the text-resolvability check errs on the strict side.
    """
    rng = np.random.default_rng(0)
    openings: dict[str, set[str]] = defaultdict(set)
    relations: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for _ in range(KNOWLEDGE_SCENES):
        scene = sample_scene(rng, 64)
        if not well_formed(scene):
            continue
        for opening in OPENINGS:
            if (picked := opening.pick(scene)) is not None:
                openings[opening.key].add(picked.name)
        for relation in RELATIONS:
            for source in scene.entities.values():
                if (reached := relation.resolve(scene, source)) is not None:
                    relations[relation.key][source.name].add(reached.name)
    return TextKnowledge(
        {key: frozenset(names) for key, names in openings.items()},
        {key: {name: frozenset(t) for name, t in by_source.items()} for key, by_source in relations.items()},
    )


def _reference_candidates(relation: Relation, source: PlannedRound, planned: list[PlannedRound]) -> frozenset[str]:
    """Entities a text-only reader could take a reference round's target to be.

    The relation applied to every entity the source round's text allows, minus the entities that
    earlier rounds' text already pins down (a dialogue never asks for the same entity twice).
    """
    reachable = text_knowledge().relations.get(relation.key, {})
    found = set().union(*(reachable.get(name, frozenset()) for name in source.text_candidates))
    pinned = {next(iter(p.text_candidates)) for p in planned if len(p.text_candidates) == 1}
    return frozenset(found - pinned)


def iter_dialogues(
    n_dialogues: int, seed: int, split: str = "train", image_size: int = 128, wording: Wording = Wording()
) -> Iterator[SyntheticDialogue]:
    """The first ``n_dialogues`` dialogues of ``split``, in memory."""
    for index in range(n_dialogues):
        yield make_dialogue(seed, split, index, image_size, wording)


def generate(
    out_dir: str | os.PathLike,
    n_dialogues: int,
    seed: int,
    split: str = "all",
    image_size: int = 128,
    progress: Callable[[str, int], None] | None = None,
    wording: Wording = Wording(),
) -> SynthSummary:
    """Write ``n_dialogues`` dialogues (PNGs + ``<split>.jsonl``) under ``out_dir``.

    ``split="all"`` writes train/val/test 80/10/10; ``progress(split, done)`` is called after each dialogue.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, not {split!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, not {image_size}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(str(out), None, None, "the output folder exists and is not a folder")
    sizes = split_sizes(n_dialogues) if split == "all" else {split: n_dialogues}
    summary = SynthSummary(out)
    for split_name, count in sizes.items():
        dialogues = []
        for item in iter_dialogues(count, seed, split_name, image_size, wording):
            _write_files(out, item)
            item.dialogue.root = out
            dialogues.append(item.dialogue)
            summary.add(split_name, item)
            if progress is not None:
                progress(split_name, len(dialogues))
        summary.files[split_name] = out / f"{split_name}.jsonl"
        write_jsonl(dialogues, summary.files[split_name])
    return summary


def _write_files(out: Path, item: SyntheticDialogue) -> None:
    """The image and the round masks of one dialogue; a file system error names the file."""
    dialogue = item.dialogue
    try:
        _save_png(out / dialogue.image, item.image)
        for round_, mask in zip(dialogue.rounds, item.masks):
            save_mask(out / round_.mask, mask)
    except OSError as error:
        raise DataError(
            str(error.filename or out), dialogue.id, None, error.strerror or str(error)
        ) from error


def _save_png(path: Path, pixels: np.ndarray) -> None:
    """Greyscale 8-bit PNG, atomically; loaders turn it into RGB."""
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
