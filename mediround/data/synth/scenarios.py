"""The five dialogue scenarios: how rounds pick their targets and how they are phrased.

A round either describes its target (``Opening``: resolvable from the image and the query alone, and
its answer names the target) or refers to an earlier round (``Relation``: the target is a function
of the referenced round's entity). A relation is only used when it is ambiguous without the
reference: applied to every entity of the scene it must reach at least two different targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mediround.data.synth.anatomy import Entity, Scene

SCENARIOS = (
    "organ-lesion",
    "anatomical-hierarchy",
    "attribute-association",
    "spatial-relationship",
    "inferential-reasoning",
)

NAMED_QUERIES = (
    "Segment the {name}.",
    "Please outline the {name}.",
    "Where is the {name}? Segment it.",
    "Can you segment the {name} in this image?",
    "Show me the {name}.",
)
NAMING_ANSWERS = (
    "The {name} is [SEG].",
    "Sure, the {name} is [SEG].",
    "Here is the {name}: [SEG].",
    "This is the {name}, [SEG].",
)
PLAIN_ANSWERS = (
    "Sure, it is [SEG].",
    "It is [SEG].",
    "Here it is: [SEG].",
    "Sure, [SEG].",
    "Found it: [SEG].",
)

Pick = Callable[[Scene], "Entity | None"]
Resolve = Callable[[Scene, Entity], "Entity | None"]


@dataclass(frozen=True)
class Opening:
    """A round that describes its target without a reference; ``pick`` returns the unique match or None."""

    key: str
    scenario: str
    pick: Pick
    queries: tuple[str, ...]


@dataclass(frozen=True)
class Relation:
    """A round whose target follows from the referenced round's entity.

    ``recent`` phrasings ("that organ") are used only when the reference is the previous round;
    ``explicit`` phrasings carry the round number as ``{r}``.
    """

    key: str
    scenario: str
    resolve: Resolve
    recent: tuple[str, ...]
    explicit: tuple[str, ...]

    def blind_targets(self, scene: Scene) -> set[str]:
        """Every target the query could mean to someone who does not know the referenced round."""
        found = (self.resolve(scene, source) for source in scene.entities.values())
        return {target.name for target in found if target is not None}


def _only(entities: list[Entity]) -> Entity | None:
    return entities[0] if len(entities) == 1 else None


def _lesions(scene: Scene) -> list[Entity]:
    return scene.of_kind("lesion")


def _named(scene: Scene, name: str) -> Entity | None:
    return scene.entities.get(name)


def _paired_with_lesion(noun: str) -> Pick:
    def pick(scene: Scene) -> Entity | None:
        return _only(
            [e for e in scene.of_kind("organ") if e.noun == noun and scene.children(e.name, "lesion")]
        )

    return pick


def _lesion_of_kind(kind: str) -> Pick:
    def pick(scene: Scene) -> Entity | None:
        return _only([e for e in _lesions(scene) if e.noun == kind])

    return pick


def _lesion_by_size(largest: bool) -> Pick:
    def pick(scene: Scene) -> Entity | None:
        lesions = sorted(_lesions(scene), key=lambda e: int(e.mask.sum()), reverse=largest)
        if len(lesions) < 2 or abs(int(lesions[0].mask.sum()) - int(lesions[1].mask.sum())) * 4 < int(
            lesions[1].mask.sum()
        ):
            return None
        return lesions[0]

    return pick


def _by_name(name: str) -> Pick:
    return lambda scene: _named(scene, name)


def _lesion_in(scene: Scene, source: Entity) -> Entity | None:
    return _only(scene.children(source.name, "lesion")) if source.kind == "organ" else None


def _host_organ(scene: Scene, source: Entity) -> Entity | None:
    return _named(scene, source.parent) if source.kind == "lesion" else None


def _lobe(level: str) -> Resolve:
    def resolve(scene: Scene, source: Entity) -> Entity | None:
        return _named(scene, f"{source.side} {level} lobe") if source.noun == "lung" else None

    return resolve


def _whole_lung(scene: Scene, source: Entity) -> Entity | None:
    return _named(scene, source.parent) if source.kind == "part" else None


def _other_lobe(scene: Scene, source: Entity) -> Entity | None:
    if source.kind != "part":
        return None
    return _named(scene, f"{source.side} {'lower' if source.level == 'upper' else 'upper'} lobe")


def _lobe_below(scene: Scene, source: Entity) -> Entity | None:
    return (
        _named(scene, f"{source.side} lower lobe")
        if source.kind == "part" and source.level == "upper"
        else None
    )


def _lobe_above(scene: Scene, source: Entity) -> Entity | None:
    return (
        _named(scene, f"{source.side} upper lobe")
        if source.kind == "part" and source.level == "lower"
        else None
    )


def _core(scene: Scene, source: Entity) -> Entity | None:
    return _only(scene.children(source.name, "core")) if source.kind == "lesion" else None


def _whole_tumour(scene: Scene, source: Entity) -> Entity | None:
    return _named(scene, source.parent) if source.kind == "core" else None


def _mirror(scene: Scene, source: Entity) -> Entity | None:
    return _named(scene, source.partner) if source.partner else None


ABOVE = {"right kidney": "liver", "left kidney": "spleen"}
BELOW = {value: key for key, value in ABOVE.items()}


def _above(scene: Scene, source: Entity) -> Entity | None:
    return _named(scene, ABOVE[source.name]) if source.name in ABOVE else None


def _below(scene: Scene, source: Entity) -> Entity | None:
    return _named(scene, BELOW[source.name]) if source.name in BELOW else None


def _other_lesion(scene: Scene, source: Entity) -> Entity | None:
    lesions = _lesions(scene)
    if source.kind != "lesion" or len(lesions) != 2 or lesions[0].noun == lesions[1].noun:
        return None
    return lesions[1] if lesions[0].name == source.name else lesions[0]


OPENINGS = (
    Opening(
        "kidney-with-lesion",
        "organ-lesion",
        _paired_with_lesion("kidney"),
        (
            "Segment the kidney that has a lesion.",
            "One kidney looks abnormal. Segment that kidney.",
            "Which kidney contains a lesion? Segment it.",
        ),
    ),
    Opening(
        "lung-with-lesion",
        "organ-lesion",
        _paired_with_lesion("lung"),
        (
            "Segment the lung that has a lesion.",
            "One lung looks abnormal. Segment that lung.",
            "Which lung contains a lesion? Segment it.",
        ),
    ),
    Opening(
        "fluid-lesion",
        "attribute-association",
        _lesion_of_kind("cyst"),
        (
            "Segment the fluid-filled lesion.",
            "Segment the lesion with smooth, uniform contents.",
            "There is a lesion that looks like a simple fluid collection. Segment it.",
        ),
    ),
    Opening(
        "solid-lesion",
        "attribute-association",
        _lesion_of_kind("tumour"),
        (
            "Segment the solid lesion.",
            "Segment the lesion with heterogeneous, mottled texture.",
            "Segment the lesion that has a distinct inner core.",
        ),
    ),
    Opening(
        "largest-lesion",
        "attribute-association",
        _lesion_by_size(True),
        (
            "Segment the largest lesion.",
            "Segment the biggest abnormality in this image.",
        ),
    ),
    Opening(
        "smallest-lesion",
        "attribute-association",
        _lesion_by_size(False),
        (
            "Segment the smallest lesion.",
            "Segment the least extensive abnormality in this image.",
        ),
    ),
    Opening(
        "below-liver",
        "spatial-relationship",
        _by_name("right kidney"),
        (
            "Segment the organ directly below the liver.",
            "Segment the kidney on the same side as the liver.",
        ),
    ),
    Opening(
        "below-spleen",
        "spatial-relationship",
        _by_name("left kidney"),
        (
            "Segment the organ directly below the spleen.",
            "Segment the kidney on the same side as the spleen.",
        ),
    ),
    Opening(
        "beside-heart",
        "spatial-relationship",
        _by_name("left lung"),
        (
            "Segment the lung that the heart leans into.",
            "Segment the lung on the same side as the heart.",
        ),
    ),
    Opening(
        "bile",
        "inferential-reasoning",
        _by_name("liver"),
        (
            "Segment the organ that produces bile.",
            "Which organ detoxifies the blood and stores glycogen? Segment it.",
        ),
    ),
    Opening(
        "blood-cells",
        "inferential-reasoning",
        _by_name("spleen"),
        (
            "Segment the organ that filters old red blood cells.",
            "Which organ would enlarge in an immune response? Segment it.",
        ),
    ),
    Opening(
        "digestion",
        "inferential-reasoning",
        _by_name("stomach"),
        (
            "Segment the organ where food is digested first.",
            "Which organ holds the swallowed food? Segment it.",
        ),
    ),
    Opening(
        "pump",
        "inferential-reasoning",
        _by_name("heart"),
        (
            "Segment the organ that pumps blood.",
            "Which organ sits between the lungs and drives the circulation? Segment it.",
        ),
    ),
    Opening(
        "malignant",
        "inferential-reasoning",
        _lesion_of_kind("tumour"),
        (
            "Segment the lesion most likely to be malignant.",
            "Which finding would most need a biopsy? Segment it.",
        ),
    ),
    Opening(
        "benign",
        "inferential-reasoning",
        _lesion_of_kind("cyst"),
        (
            "Segment the lesion most likely to be benign.",
            "Which finding could safely be left alone? Segment it.",
        ),
    ),
)

RELATIONS = (
    Relation(
        "lesion-in",
        "organ-lesion",
        _lesion_in,
        (
            "Segment the lesion inside that organ.",
            "Now find the abnormality in it.",
            "Segment the lesion within the organ you just found.",
            "Is there a lesion in that organ? Segment it.",
        ),
        (
            "Segment the lesion inside the organ from round {r}.",
            "Find the abnormality in the organ segmented in round {r}.",
            "Segment the lesion located in the structure from round {r}.",
        ),
    ),
    Relation(
        "host-organ",
        "organ-lesion",
        _host_organ,
        (
            "Segment the organ that contains this lesion.",
            "Which organ is it in? Segment that organ.",
            "Now segment the whole organ this lesion belongs to.",
        ),
        (
            "Segment the organ containing the lesion from round {r}.",
            "Which organ holds the lesion of round {r}? Segment it.",
        ),
    ),
    Relation(
        "upper-lobe",
        "anatomical-hierarchy",
        _lobe("upper"),
        (
            "Segment the upper lobe of that lung.",
            "Now only its upper lobe, please.",
        ),
        (
            "Segment the upper lobe of the lung from round {r}.",
            "Take the lung from round {r} and segment its upper lobe.",
        ),
    ),
    Relation(
        "lower-lobe",
        "anatomical-hierarchy",
        _lobe("lower"),
        (
            "Segment the lower lobe of that lung.",
            "Now only its lower lobe, please.",
        ),
        (
            "Segment the lower lobe of the lung from round {r}.",
            "Take the lung from round {r} and segment its lower lobe.",
        ),
    ),
    Relation(
        "whole-lung",
        "anatomical-hierarchy",
        _whole_lung,
        (
            "Segment the whole lung this lobe belongs to.",
            "Now segment the entire organ that contains it.",
        ),
        (
            "Segment the whole lung that the lobe from round {r} belongs to.",
            "Which lung contains the lobe of round {r}? Segment the entire lung.",
        ),
    ),
    Relation(
        "other-lobe",
        "anatomical-hierarchy",
        _other_lobe,
        (
            "Segment the other lobe of the same lung.",
            "Now the remaining lobe of that lung.",
        ),
        (
            "Segment the other lobe of the lung containing the lobe from round {r}.",
            "Segment the lobe that shares a lung with the lobe from round {r}.",
        ),
    ),
    Relation(
        "core",
        "anatomical-hierarchy",
        _core,
        (
            "Segment the core of that lesion.",
            "Now segment only its inner core.",
        ),
        (
            "Segment the core of the lesion from round {r}.",
            "Segment the inner part of the lesion found in round {r}.",
        ),
    ),
    Relation(
        "whole-tumour",
        "anatomical-hierarchy",
        _whole_tumour,
        (
            "Segment the whole lesion around that core.",
            "Now segment the entire lesion this core is part of.",
        ),
        (
            "Segment the whole lesion around the core from round {r}.",
            "Segment the entire lesion that the core of round {r} belongs to.",
        ),
    ),
    Relation(
        "other-lesion",
        "attribute-association",
        _other_lesion,
        (
            "Segment the lesion that looks different from this one.",
            "Now segment the lesion of the other type.",
        ),
        (
            "Segment the lesion whose appearance differs from the one in round {r}.",
            "Segment the lesion that is not of the same type as the one from round {r}.",
        ),
    ),
    Relation(
        "mirror",
        "spatial-relationship",
        _mirror,
        (
            "Segment the organ on the other side.",
            "Now the matching organ on the opposite side.",
            "Segment its mirror-image counterpart.",
            "Segment the other {noun}.",
        ),
        (
            "Segment the counterpart of the organ from round {r} on the opposite side.",
            "Segment the {noun} on the other side from the one in round {r}.",
        ),
    ),
    Relation(
        "above",
        "spatial-relationship",
        _above,
        (
            "Segment the organ directly above it.",
            "Now the organ just above that one.",
        ),
        (
            "Segment the organ directly above the organ from round {r}.",
            "Which organ lies just above the one from round {r}? Segment it.",
        ),
    ),
    Relation(
        "below",
        "spatial-relationship",
        _below,
        (
            "Segment the organ directly below it.",
            "Now the organ just below that one.",
        ),
        (
            "Segment the organ directly below the organ from round {r}.",
            "Which organ lies just below the one from round {r}? Segment it.",
        ),
    ),
    Relation(
        "lobe-below",
        "spatial-relationship",
        _lobe_below,
        ("Segment the lobe just below it.", "Now the lobe underneath that one."),
        (
            "Segment the lobe just below the lobe from round {r}.",
            "Which lobe lies under the lobe of round {r}? Segment it.",
        ),
    ),
    Relation(
        "lobe-above",
        "spatial-relationship",
        _lobe_above,
        ("Segment the lobe just above it.", "Now the lobe on top of that one."),
        (
            "Segment the lobe just above the lobe from round {r}.",
            "Which lobe lies over the lobe of round {r}? Segment it.",
        ),
    ),
    Relation(
        "explain",
        "inferential-reasoning",
        _lesion_in,
        (
            "What in that organ could explain the patient's symptoms? Segment it.",
            "Segment the finding in it that a radiologist would report.",
        ),
        (
            "What in the organ from round {r} could explain the symptoms? Segment it.",
            "Segment the finding a radiologist would report in the organ of round {r}.",
        ),
    ),
    Relation(
        "compensate",
        "inferential-reasoning",
        _mirror,
        (
            "If that organ failed, which organ would take over its work? Segment it.",
            "Segment the organ that would compensate if this one were removed.",
        ),
        (
            "Segment the organ that would compensate if the one from round {r} failed.",
            "If the organ of round {r} were removed, which organ would take over? Segment it.",
        ),
    ),
    Relation(
        "impaired-organ",
        "inferential-reasoning",
        _host_organ,
        (
            "Which organ's function could this lesion impair? Segment that organ.",
            "Segment the organ whose work this lesion could disturb.",
        ),
        (
            "Which organ could the lesion from round {r} impair? Segment it.",
            "Segment the organ whose function the lesion of round {r} threatens.",
        ),
    ),
    Relation(
        "necrosis",
        "inferential-reasoning",
        _core,
        (
            "Segment the part of that lesion most likely to be necrotic.",
            "Where inside it would dead tissue most likely be? Segment that part.",
        ),
        (
            "Segment the part of the lesion from round {r} most likely to be necrotic.",
            "Segment the region of the lesion from round {r} that is probably necrotic.",
        ),
    ),
)
