"""The released MR-MedSeg JSON: a JSON list of SegLLM-style conversations, read natively into dialogues.

An item is ``{"task": "segmentation", "base": "[null]", "conversations": [turn, ...]}`` whose turns
alternate ``{"from": "human", "value": ...}`` and ``{"from": "gpt", "value": ...}``. Bracket tokens in
the values name files relative to the dataset root: ``[IMAGE256:p]`` (the image, first human turn),
``[MASK-DECODE:p]`` (the mask a gpt turn outputs), ``[MASK-ENCODE:p][BOX-ENCODE:p]`` plus ``"ind": k``
(a human turn refers to the k-th earlier MASK-DECODE, 0-based), ``[REF-DECODE:p]`` (the reference
named in a gpt answer).

Reading: query = human text without tokens; answer = gpt text with MASK-DECODE -> ``[SEG]`` and
REF-DECODE removed (an empty gpt turn: no answer, the model writes its own at inference); ref = the
1-based round of the k-th MASK-DECODE. Whatever the canonical rendering
would not reproduce exactly (text layout, item fields) is kept in ``extra["mrmedseg"]`` so that
MR-MedSeg -> Dialogue -> JSONL -> Dialogue -> MR-MedSeg gives back the same JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from mediround.atomic import atomic_open
from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats.common import Problem, attach, check_path, guard_for, item_label
from mediround.data.paths import RootGuard
from mediround.errors import DataError

TOKEN = re.compile(r"\[(IMAGE256|MASK-DECODE|MASK-ENCODE|BOX-ENCODE|REF-DECODE):([^\]]*)\]")
SEG = "[SEG]"
TASK = "segmentation"
BASE = "[null]"
ITEM_FIELDS_TO_DIALOGUE = ("modality", "scenario", "difficulty")
TURN_FIELDS_TO_ROUND = ("entity", "difficulty", "names_target")
_HUMAN_KEYS = {"from", "value", "ind", *TURN_FIELDS_TO_ROUND}
_GPT_KEYS = {"from", "value"}


def _tokens(value: str) -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in TOKEN.finditer(value)]


def _strip_tokens(value: str) -> str:
    return TOKEN.sub("", value).strip()


def _answer_text(value: str) -> str | None:
    """The answer of a gpt turn; None for an empty turn (new data with questions only)."""

    def replace(match: re.Match) -> str:
        return SEG if match.group(1) == "MASK-DECODE" else ""

    return TOKEN.sub(replace, value).strip() or None


def _parse_pair(
    human: dict, gpt: dict, first: bool, prefix_h: str, prefix_g: str
) -> tuple[dict, list[Problem]]:
    """Fields of one round from a human/gpt turn pair: image, query, answer, mask, encode (reference path)."""
    problems: list[Problem] = []
    parsed: dict = {"image": None, "encode": None, "box": None, "mask": None}
    for kind, path in _tokens(human["value"]):
        if kind == "IMAGE256" and first and parsed["image"] is None:
            parsed["image"] = path
        elif kind == "MASK-ENCODE" and parsed["encode"] is None:
            parsed["encode"] = path
        elif kind == "BOX-ENCODE" and parsed["box"] is None:
            parsed["box"] = path
        else:
            problems.append((f"{prefix_h}value", f"unexpected [{kind}:...] token in this human turn"))
    decodes = [path for kind, path in _tokens(gpt["value"]) if kind == "MASK-DECODE"]
    others = [kind for kind, _ in _tokens(gpt["value"]) if kind not in ("MASK-DECODE", "REF-DECODE")]
    if len(decodes) > 1:
        problems.append(
            (f"{prefix_g}value", f"{len(decodes)} [MASK-DECODE:...] tokens; a turn outputs at most one mask")
        )
    for kind in others:
        problems.append((f"{prefix_g}value", f"unexpected [{kind}:...] token in a gpt turn"))
    parsed["mask"] = decodes[0] if decodes else None
    parsed["query"] = _strip_tokens(human["value"])
    parsed["answer"] = _answer_text(gpt["value"])
    return parsed, problems


def _check_turn(turn: object, index: int, speaker: str) -> list[Problem]:
    field = f"conversations[{index}]"
    if not isinstance(turn, dict):
        return [(field, f"a turn must be a JSON object, got {type(turn).__name__}")]
    problems: list[Problem] = []
    allowed = _HUMAN_KEYS if speaker == "human" else _GPT_KEYS
    for key in turn:
        if key not in allowed:
            problems.append(
                (
                    f"{field}.{key}",
                    f"unknown field '{key}' in a {speaker} turn (allowed: {', '.join(sorted(allowed))})",
                )
            )
    if turn.get("from") != speaker:
        problems.append(
            (f"{field}.from", f"expected '{speaker}' (turns alternate human/gpt), got {turn.get('from')!r}")
        )
    if not isinstance(turn.get("value"), str):
        problems.append((f"{field}.value", f"must be a string, got {type(turn.get('value')).__name__}"))
    ind = turn.get("ind")
    if ind is not None and (isinstance(ind, bool) or not isinstance(ind, int)):
        problems.append((f"{field}.ind", f"must be an integer or null, got {type(ind).__name__} {ind!r:.40}"))
    for name, kinds in (("entity", (str,)), ("difficulty", (str,)), ("names_target", (bool,))):
        if name in turn and not isinstance(turn[name], kinds):
            problems.append(
                (f"{field}.{name}", f"must be {'true/false' if name == 'names_target' else 'a string'}")
            )
    return problems


def item_to_dialogue(
    item: object, index: int, root: Path, guard: RootGuard | None = None
) -> tuple[Dialogue | None, list[Problem]]:
    """The dialogue of one MR-MedSeg item, or None and every (field, reason) problem found in it."""
    if not isinstance(item, dict):
        return None, [(None, f"an item must be a JSON object, got {type(item).__name__}")]
    problems: list[Problem] = []
    if item.get("task", TASK) != TASK:
        problems.append(("task", f"task {item.get('task')!r} is not supported (only '{TASK}')"))
    if "id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], str | int)):
        problems.append(("id", f"must be a string or integer, got {type(item['id']).__name__}"))
    for name in ITEM_FIELDS_TO_DIALOGUE:
        if name in item and not isinstance(item[name], str | None):
            problems.append((name, f"must be a string or null, got {type(item[name]).__name__}"))
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        problems.append(("conversations", "required: a non-empty list of turns"))
        return None, problems
    if len(turns) % 2:
        problems.append(
            ("conversations", f"odd number of turns ({len(turns)}): turns must alternate human/gpt")
        )
    for index_turn, turn in enumerate(turns):
        problems += _check_turn(turn, index_turn, "human" if index_turn % 2 == 0 else "gpt")
    if problems:
        return None, problems

    rounds: list[Round] = []
    image = None
    decoded_rounds: list[int] = []
    for number in range(1, len(turns) // 2 + 1):
        h, g = 2 * number - 2, 2 * number - 1
        human, gpt = turns[h], turns[g]
        prefix_h, prefix_g = f"conversations[{h}].", f"conversations[{g}]."
        parsed, found = _parse_pair(human, gpt, number == 1, prefix_h, prefix_g)
        problems += found
        if number == 1:
            image = parsed["image"]
            if image is None:
                problems.append((f"{prefix_h}value", "no [IMAGE256:...] token in the first human turn"))
            else:
                problems += check_path(guard, image, f"{prefix_h}value")
        ref = None
        ind = human.get("ind")
        if ind is not None:
            if not 0 <= ind < len(decoded_rounds):
                problems.append(
                    (
                        f"{prefix_h}ind",
                        f"ind {ind} must point to an earlier [MASK-DECODE] (0..{len(decoded_rounds) - 1})"
                        if decoded_rounds
                        else f"ind {ind} points forward: no earlier round has a mask",
                    )
                )
            else:
                ref = decoded_rounds[ind]
                expected = rounds[ref - 1].mask
                if parsed["encode"] is None:
                    problems.append((f"{prefix_h}value", f"ind {ind} given but no [MASK-ENCODE:...] token"))
                elif parsed["encode"] != expected:
                    problems.append(
                        (
                            f"{prefix_h}value",
                            f"[MASK-ENCODE:{parsed['encode']}] differs from round {ref}'s mask ({expected})",
                        )
                    )
                if parsed["box"] is not None and parsed["box"] != parsed["encode"]:
                    problems.append(
                        (
                            f"{prefix_h}value",
                            f"[BOX-ENCODE:{parsed['box']}] differs from [MASK-ENCODE:{parsed['encode']}]",
                        )
                    )
        elif parsed["encode"] is not None:
            problems.append((f"{prefix_h}ind", "[MASK-ENCODE:...] given without 'ind'"))
        if parsed["mask"] is not None:
            problems += check_path(guard, parsed["mask"], f"{prefix_g}value")
            decoded_rounds.append(number)
        round_ = Round(
            query=parsed["query"],
            answer=parsed["answer"],
            mask=parsed["mask"],
            ref=ref,
            **{name: human.get(name) for name in TURN_FIELDS_TO_ROUND},
        )
        rounds.append(round_)
        if (
            not problems
            and image is not None
            and _render_pair(round_, rounds, image, number == 1) != (human, gpt)
        ):
            round_.extra = {"mrmedseg": {"human": human, "gpt": gpt}}
    if problems or image is None:
        return None, problems
    dialogue_id = str(item["id"]) if "id" in item else str(index)
    dialogue = Dialogue(
        id=dialogue_id,
        image=image,
        rounds=rounds,
        root=root,
        source="mrmedseg",
        item=index,
        **{name: item.get(name) for name in ITEM_FIELDS_TO_DIALOGUE},
    )
    fields = {key: value for key, value in item.items() if key != "conversations"}
    if fields != _canonical_fields(dialogue, index):
        dialogue.extra = {"mrmedseg": {"item": fields}}
    return dialogue, []


def _render_pair(round_: Round, rounds: list[Round], image: str, first: bool) -> tuple[dict, dict]:
    """The canonical human and gpt turns of a round (``rounds`` holds the dialogue's rounds so far)."""
    tokens = f"[IMAGE256:{image}]" if first else ""
    human: dict = {"from": "human"}
    reference = None
    if round_.ref is not None:
        reference = rounds[round_.ref - 1].mask
        tokens += f"[MASK-ENCODE:{reference}][BOX-ENCODE:{reference}]"
    human["value"] = f"{tokens} {round_.query}" if tokens and round_.query else tokens or round_.query
    if round_.ref is not None:
        human["ind"] = sum(1 for earlier in rounds[: round_.ref - 1] if earlier.mask is not None)
    for name in TURN_FIELDS_TO_ROUND:
        if getattr(round_, name) is not None:
            human[name] = getattr(round_, name)
    answer = round_.answer or ""
    if round_.mask is not None:
        decode = (
            f"[REF-DECODE:{reference}]" if reference is not None else ""
        ) + f"[MASK-DECODE:{round_.mask}]"
        answer = answer.replace(SEG, decode, 1) if SEG in answer else f"{answer} {decode}".strip()
    return human, {"from": "gpt", "value": answer}


def _canonical_fields(dialogue: Dialogue, position: int) -> dict:
    """Item fields besides the turns; the id is left out when it is the item's position (as released)."""
    fields: dict = {} if dialogue.id == str(position) else {"id": dialogue.id}
    fields.update(task=TASK, base=BASE)
    for name in ITEM_FIELDS_TO_DIALOGUE:
        if getattr(dialogue, name) is not None:
            fields[name] = getattr(dialogue, name)
    return fields


def _same_round(kept: tuple[dict, dict], round_: Round, rounds: list[Round], image: str, first: bool) -> bool:
    """Whether the kept original turns still say what the (possibly edited or relocated) round says."""
    human, gpt = kept
    parsed, problems = _parse_pair(human, gpt, first, "", "")
    if problems or (first and parsed["image"] != image):
        return False
    reference = rounds[round_.ref - 1].mask if round_.ref is not None else None
    expected_ind = (
        None if round_.ref is None else sum(1 for r in rounds[: round_.ref - 1] if r.mask is not None)
    )
    return (
        parsed["query"] == round_.query
        and parsed["answer"] == round_.answer
        and parsed["mask"] == round_.mask
        and parsed["encode"] == reference
        and human.get("ind") == expected_ind
        and all(human.get(name) == getattr(round_, name) for name in TURN_FIELDS_TO_ROUND)
    )


def unwritable_reason(dialogue: Dialogue) -> Problem | None:
    """Why MR-MedSeg cannot hold ``dialogue``, as a (field, reason) problem, or None.

    A human turn refers to an earlier round by the index of its [MASK-DECODE] token, so a ref to a round
    without a ground-truth mask has no MR-MedSeg form (JSONL holds it).
    """
    for index, round_ in enumerate(dialogue.rounds):
        if round_.ref is not None and dialogue.rounds[round_.ref - 1].mask is None:
            return (
                f"rounds[{index}].ref",
                (f"refers to round {round_.ref}, which has no mask: MR-MedSeg refers to earlier rounds by "
                "their [MASK-DECODE] token, so this dialogue can only be written as JSONL"),
            )
    return None


def dialogue_to_item(dialogue: Dialogue, position: int) -> dict:
    """The MR-MedSeg item of the dialogue at ``position``; kept original text is reused where accurate."""
    kept_item = dialogue.extra.get("mrmedseg", {}).get("item")
    if kept_item is None:
        item = _canonical_fields(dialogue, position)
    else:
        item = dict(kept_item)
        if "id" in item:
            item["id"] = item["id"] if str(item["id"]) == dialogue.id else dialogue.id
        elif dialogue.id != str(position):
            item = {"id": dialogue.id, **item}
        for name in ITEM_FIELDS_TO_DIALOGUE:
            if getattr(dialogue, name) is not None:
                item[name] = getattr(dialogue, name)
            else:
                item.pop(name, None)
    turns: list[dict] = []
    for number, round_ in enumerate(dialogue.rounds, start=1):
        kept = round_.extra.get("mrmedseg")
        first = number == 1
        if kept is not None and _same_round(
            (kept["human"], kept["gpt"]), round_, dialogue.rounds, dialogue.image, first
        ):
            turns += [kept["human"], kept["gpt"]]
        else:
            turns += list(_render_pair(round_, dialogue.rounds, dialogue.image, first))
    item["conversations"] = turns
    return item


def retarget(dialogue: Dialogue, move: Callable[[str], str]) -> None:
    """Rewrite every path inside the kept original turns with ``move`` (used when paths are relocated)."""

    def replace(match: re.Match) -> str:
        return f"[{match.group(1)}:{move(match.group(2))}]"

    for round_ in dialogue.rounds:
        kept = round_.extra.get("mrmedseg")
        if kept is None:
            continue
        round_.extra = {
            "mrmedseg": {
                side: {**turn, "value": TOKEN.sub(replace, turn["value"])} for side, turn in kept.items()
            }
        }


def read_mrmedseg(
    path: str | os.PathLike, root: Path, allow_outside_root: bool = False
) -> tuple[list[Dialogue], list[DataError], int]:
    """Dialogues of an MR-MedSeg JSON file, the problems of the skipped items, and the number of items.

    Raises ``DataError`` when the file is not readable, not UTF-8, not JSON, or not a JSON list.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise DataError(str(path), None, None, f"cannot read file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(str(path), None, None, f"not UTF-8 text (byte {error.start})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            str(path), None, None, f"invalid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if isinstance(items, dict):
        items = [items]  # one item object, as the authors' data_sample.json
    if not isinstance(items, list):
        raise DataError(
            str(path), None, None,
            f"an MR-MedSeg file must be a JSON list or one item object, got {type(items).__name__}",
        )
    guard = guard_for(root, allow_outside_root)
    dialogues: list[Dialogue] = []
    problems: list[DataError] = []
    for index, item in enumerate(items):
        dialogue, found = item_to_dialogue(item, index, root, guard)
        if dialogue is None:
            known_id = item.get("id", index) if isinstance(item, dict) else index
            problems += attach(path, item_label("item", index, str(known_id)), found)
        else:
            dialogues.append(dialogue)
    return dialogues, problems, len(items)


def write_mrmedseg(dialogues: Iterable[Dialogue], path: str | os.PathLike) -> None:
    """Write dialogues as an MR-MedSeg JSON list, atomically; ``DataError`` (nothing written) for a dialogue
    MR-MedSeg cannot hold (``unwritable_reason``)."""
    dialogues = list(dialogues)
    for position, dialogue in enumerate(dialogues):
        problem = unwritable_reason(dialogue)
        if problem is not None:
            raise DataError(str(path), item_label("dialogue", position, dialogue.id), *problem)
    items = [dialogue_to_item(dialogue, position) for position, dialogue in enumerate(dialogues)]
    with atomic_open(path) as handle:
        json.dump(items, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
