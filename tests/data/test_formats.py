"""Reading JSONL and MR-MedSeg files: detection, parsing, lossless round trips, and every broken case."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dialogue_files import MR_ITEMS, jsonl_line, write_jsonl_lines

from mediround.data.formats import detect, load_dialogues, write_jsonl, write_mrmedseg
from mediround.errors import DataError


def problems_by_item(result) -> dict[str, list[tuple[str | None, str]]]:
    found: dict[str, list[tuple[str | None, str]]] = {}
    for problem in result.problems:
        found.setdefault(problem.item, []).append((problem.field, problem.reason))
    return found


def test_mrmedseg_items_become_dialogues(dataset: Path) -> None:
    result = load_dialogues(dataset / "mr.json")
    assert result.format == "mrmedseg" and result.problems == [] and result.total == 2
    first, second = result.dialogues
    assert first.id == "0" and second.id == "s2-a"
    assert first.image == "images/s1.png" and first.root == dataset
    assert [r.query for r in first.rounds] == [
        "Segment the liver.",
        "Segment the organ beside it.",
        "Which structure is usually larger?",
        "Segment what lies below it.",
    ]
    assert [r.answer for r in first.rounds] == ["[SEG].", "It is [SEG].", "The liver.", "[SEG]"]
    assert [r.mask for r in first.rounds] == [
        "masks/s1_r00.png",
        "masks/s1_r01.png",
        None,
        "masks/s1_r02.png",
    ]
    # ind counts MASK-DECODEs: ind 1 is the second decoded mask, which round 2 produced.
    assert [r.ref for r in first.rounds] == [None, 1, None, 2]
    assert first.image_path == dataset / "images" / "s1.png"
    assert second.rounds[0].query == "Segment  the lesion, please."
    assert second.rounds[0].answer == "Sure, [SEG] ."


def test_standard_layout_needs_no_kept_text(dataset: Path) -> None:
    first, second = load_dialogues(dataset / "mr.json").dialogues
    # Only round 4 differs from the canonical rendering: its answer names no [REF-DECODE].
    assert [bool(r.extra) for r in first.rounds] == [False, False, False, True]
    assert first.rounds[3].extra["mrmedseg"]["gpt"] == {
        "from": "gpt",
        "value": "[MASK-DECODE:masks/s1_r02.png]",
    }
    # The first item has no id: its id is its position, so nothing needs keeping to write it back.
    assert first.extra == {}
    assert second.rounds[0].extra["mrmedseg"]["human"] == MR_ITEMS[1]["conversations"][0]
    assert second.extra["mrmedseg"]["item"]["origin"] == "hand-written"


def test_mrmedseg_to_jsonl_to_mrmedseg_is_lossless(dataset: Path) -> None:
    loaded = load_dialogues(dataset / "mr.json")
    write_jsonl(loaded.dialogues, dataset / "copy.jsonl")
    via_jsonl = load_dialogues(dataset / "copy.jsonl")
    assert via_jsonl.format == "jsonl" and via_jsonl.problems == []
    write_mrmedseg(via_jsonl.dialogues, dataset / "back.json")
    assert json.loads((dataset / "back.json").read_text()) == MR_ITEMS


def test_jsonl_to_mrmedseg_to_jsonl_keeps_every_field(dataset: Path) -> None:
    record = jsonl_line("d1", difficulty="hard")
    record["rounds"][1].update(entity="spleen", names_target=False, difficulty="regular")
    write_jsonl_lines(dataset / "one.jsonl", [record])
    write_mrmedseg(load_dialogues(dataset / "one.jsonl").dialogues, dataset / "one.json")
    item = json.loads((dataset / "one.json").read_text())[0]
    assert (item["id"], item["task"], item["base"], item["difficulty"]) == (
        "d1",
        "segmentation",
        "[null]",
        "hard",
    )
    assert item["conversations"][2]["value"] == (
        "[MASK-ENCODE:masks/s1_r00.png][BOX-ENCODE:masks/s1_r00.png] Segment the organ beside it."
    )
    assert (
        item["conversations"][3]["value"]
        == "It is [REF-DECODE:masks/s1_r00.png][MASK-DECODE:masks/s1_r01.png]."
    )
    write_jsonl(load_dialogues(dataset / "one.json").dialogues, dataset / "again.jsonl")
    assert json.loads((dataset / "again.jsonl").read_text()) == record


def test_edited_round_replaces_the_kept_original_text(dataset: Path) -> None:
    second = load_dialogues(dataset / "mr.json").dialogues[1]
    second.rounds[0].query = "Segment the lesion."
    write_mrmedseg([second], dataset / "edited.json")
    turns = json.loads((dataset / "edited.json").read_text())[0]["conversations"]
    assert turns[0]["value"] == "[IMAGE256:images/s2.png] Segment the lesion."
    assert turns[1]["value"] == "Sure, [MASK-DECODE:masks/s2_r00.png] ."


def test_detect_reads_content_not_extension(tmp_path: Path) -> None:
    (tmp_path / "list.jsonl").write_text('[\n  {"conversations": []}\n]\n')
    (tmp_path / "lines.json").write_text('{"id": "a"}\n{"id": "b"}\n')
    (tmp_path / "compact.txt").write_text('[{"conversations": []}]')
    (tmp_path / "array_lines.jsonl").write_text("[1, 2]\n[3]\n")
    assert detect(tmp_path / "list.jsonl") == "mrmedseg"
    assert detect(tmp_path / "lines.json") == "jsonl"
    assert detect(tmp_path / "compact.txt") == "mrmedseg"
    assert detect(tmp_path / "array_lines.jsonl") == "jsonl"
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="empty file"):
        detect(tmp_path / "empty.jsonl")


def test_broken_jsonl_lines_are_reported_and_good_lines_kept(dataset: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    os.symlink(outside, dataset / "images" / "link.png")
    unknown = jsonl_line("d5")
    unknown["rounds"][0]["qeury"] = "typo"
    forward = jsonl_line("d7")
    forward["rounds"][0]["ref"] = 1
    out_of_range = jsonl_line("d6")
    out_of_range["rounds"][1]["ref"] = 5
    bool_ref = jsonl_line("d12")
    bool_ref["rounds"][1]["ref"] = True
    no_mask = jsonl_line("d13")
    del no_mask["rounds"][0]["mask"]
    lines = [
        jsonl_line("good-1"),
        '{"id": "d2", "image": ',
        "[1, 2]",
        jsonl_line("d4", image=5),
        unknown,
        out_of_range,
        forward,
        jsonl_line("d8", image="/etc/hosts"),
        jsonl_line("d9", image="../outside.png"),
        b'{"id": "d10", "image": "\xff\xfe"}',
        jsonl_line("d11", image="images/link.png"),
        bool_ref,
        no_mask,
        "",
        jsonl_line("good-2", image="images/s2.png", scenario=None),
    ]
    result = load_dialogues(write_jsonl_lines(dataset / "broken.jsonl", lines))
    assert [d.id for d in result.dialogues] == ["good-1", "d13", "good-2"]
    assert [d.item for d in result.dialogues] == [1, 13, 15]
    assert result.total == 14
    assert all(problem.file == str(dataset / "broken.jsonl") for problem in result.problems)
    found = problems_by_item(result)
    assert set(found) == {
        "line 2",
        "line 3",
        "line 4: id d4",
        "line 5: id d5",
        "line 6: id d6",
        "line 7: id d7",
        "line 8: id d8",
        "line 9: id d9",
        "line 10",
        "line 11: id d11",
        "line 12: id d12",
    }
    assert found["line 2"][0][0] is None and "invalid JSON" in found["line 2"][0][1]
    assert "must be a JSON object, got list" in found["line 3"][0][1]
    assert found["line 4: id d4"] == [("image", "must be a string, got int 5")]
    assert (
        found["line 5: id d5"][0][0] == "rounds[0].qeury"
        and "unknown field 'qeury'" in found["line 5: id d5"][0][1]
    )
    assert found["line 6: id d6"] == [
        ("rounds[1].ref", "ref 5 must point to an earlier round (allowed 1..1)")
    ]
    assert found["line 7: id d7"] == [
        ("rounds[0].ref", "ref 1 must point to an earlier round (no earlier round exists)")
    ]
    assert found["line 8: id d8"][0][0] == "image" and "absolute path" in found["line 8: id d8"][0][1]
    assert found["line 9: id d9"][0][0] == "image" and "leaves the root" in found["line 9: id d9"][0][1]
    assert "not UTF-8" in found["line 10"][0][1]
    assert found["line 11: id d11"][0][0] == "image" and "leaves the root" in found["line 11: id d11"][0][1]
    assert found["line 12: id d12"][0][0] == "rounds[1].ref" and "got bool" in found["line 12: id d12"][0][1]


def test_ref_to_a_round_without_mask_loads_for_inference_but_not_for_training(dataset: Path) -> None:
    unlabelled = jsonl_line("unlabelled")
    for round_ in unlabelled["rounds"]:
        del round_["mask"]
    first_only = jsonl_line("first-only")
    del first_only["rounds"][0]["mask"]
    path = write_jsonl_lines(dataset / "partly.jsonl", [jsonl_line("good"), unlabelled, first_only])
    loaded = load_dialogues(path)
    assert [d.id for d in loaded.dialogues] == ["good", "unlabelled", "first-only"] and not loaded.problems
    assert loaded.dialogues[2].rounds[1].ref == 1 and loaded.dialogues[2].rounds[0].mask is None
    training = load_dialogues(path, require_labels=True)
    assert [d.id for d in training.dialogues] == ["good"]
    assert [(p.item, p.field) for p in training.problems] == [
        ("line 2: id unlabelled", "rounds[0].mask"),
        ("line 3: id first-only", "rounds[0].mask"),
    ]
    assert "training needs one for every round" in training.problems[0].reason


def test_mrmedseg_cannot_hold_a_ref_to_a_round_without_mask(dataset: Path) -> None:
    first_only = jsonl_line("first-only")
    del first_only["rounds"][0]["mask"]
    path = write_jsonl_lines(dataset / "partly.jsonl", [jsonl_line("good"), first_only])
    dialogues = load_dialogues(path).dialogues
    with pytest.raises(DataError, match=r"id first-only: field 'rounds\[1\]\.ref'.*only be written as JSONL"):
        write_mrmedseg(dialogues, dataset / "out.json")
    assert not (dataset / "out.json").exists()
    unlabelled = jsonl_line("unlabelled")
    for round_ in unlabelled["rounds"]:
        del round_["mask"]
        round_.pop("ref", None)
    kept = dialogues[:1] + load_dialogues(write_jsonl_lines(dataset / "plain.jsonl", [unlabelled])).dialogues
    write_mrmedseg(kept, dataset / "good.json")
    back = load_dialogues(dataset / "good.json").dialogues
    assert [d.id for d in back] == ["good", "unlabelled"]
    assert [(r.query, r.answer, r.mask) for r in back[1].rounds] == [
        (r.query, r.answer, None) for r in kept[1].rounds]


def test_symlinked_folder_leaving_the_root_is_refused(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", dataset / "linked")
    os.symlink(dataset / "images", dataset / "inside")
    path = write_jsonl_lines(
        dataset / "links.jsonl",
        [jsonl_line("out", image="linked/a.png"), jsonl_line("in", image="inside/s1.png")],
    )
    result = load_dialogues(path)
    assert [d.id for d in result.dialogues] == ["in"]
    assert [(p.item, p.field) for p in result.problems] == [("line 1: id out", "image")]
    assert "leaves the root" in result.problems[0].reason


def test_duplicate_ids_keep_the_first(dataset: Path) -> None:
    lines = [jsonl_line("a"), jsonl_line("b"), jsonl_line("a"), jsonl_line("", rounds=[])]
    result = load_dialogues(write_jsonl_lines(dataset / "dup.jsonl", lines))
    assert [d.item for d in result.dialogues] == [1, 2]
    assert [(p.item, p.field, p.reason) for p in result.problems] == [
        ("line 4", "id", "must not be empty"),
        ("line 4", "rounds", "a dialogue needs at least one round"),
        ("line 3: id a", "id", "duplicate id 'a' (first at line 1: id a)"),
    ]
    # The second item has no id, so its id is its position "1", which the first item already uses.
    (dataset / "dup.json").write_text(json.dumps([{**MR_ITEMS[1], "id": "1"}, MR_ITEMS[0]]))
    assert [p.item for p in load_dialogues(dataset / "dup.json").problems] == ["item 1: id 1"]


def test_outside_paths_are_accepted_when_allowed(dataset: Path) -> None:
    path = write_jsonl_lines(dataset / "outside.jsonl", [jsonl_line("d1", image="../elsewhere/a.png")])
    assert load_dialogues(path).dialogues == []
    allowed = load_dialogues(path, allow_outside_root=True)
    assert (
        allowed.problems == [] and allowed.dialogues[0].image_path == dataset.parent / "elsewhere" / "a.png"
    )


def test_root_option_changes_where_paths_resolve(dataset: Path) -> None:
    nested = dataset / "lists"
    nested.mkdir()
    path = write_jsonl_lines(nested / "d.jsonl", [jsonl_line("d1")])
    assert load_dialogues(path, root=dataset).dialogues[0].image_path == dataset / "images" / "s1.png"
    assert load_dialogues(path).dialogues[0].image_path == nested / "images" / "s1.png"


def test_broken_mrmedseg_items_are_reported_and_good_items_kept(dataset: Path) -> None:
    good = MR_ITEMS[1]
    odd = {"id": "odd", "conversations": good["conversations"][:1]}
    forward = {
        "id": "fwd",
        "conversations": [
            {"from": "human", "value": "[IMAGE256:images/s1.png] Segment it.", "ind": 0},
            {"from": "gpt", "value": "[MASK-DECODE:masks/s1_r00.png]"},
        ],
    }
    mismatch = json.loads(json.dumps(MR_ITEMS[0]))
    mismatch["id"] = "mismatch"
    mismatch["conversations"][2]["value"] = mismatch["conversations"][2]["value"].replace("r00", "r02")
    wrong_task = {**good, "id": "vqa", "task": "vqa"}
    unknown_key = json.loads(json.dumps(good))
    unknown_key["id"] = "typo"
    unknown_key["conversations"][1]["valeu"] = "x"
    no_image = {
        "id": "noimg",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "[SEG]"}],
    }
    swapped = {"id": "swap", "conversations": list(reversed(good["conversations"]))}
    escape = json.loads(json.dumps(good))
    escape["id"] = "esc"
    escape["conversations"][1]["value"] = "[MASK-DECODE:../../m.png]"
    items = [good, odd, forward, mismatch, wrong_task, unknown_key, no_image, "text", swapped, escape]
    (dataset / "broken.json").write_text(json.dumps(items))
    result = load_dialogues(dataset / "broken.json")
    assert [d.id for d in result.dialogues] == ["s2-a"]
    found = problems_by_item(result)
    assert found["item 1: id odd"] == [
        ("conversations", "odd number of turns (1): turns must alternate human/gpt")
    ]
    assert found["item 2: id fwd"] == [
        ("conversations[0].ind", "ind 0 points forward: no earlier round has a mask"),
    ]
    assert found["item 3: id mismatch"][0][0] == "conversations[2].value"
    assert "differs from round 1's mask" in found["item 3: id mismatch"][0][1]
    assert found["item 4: id vqa"][0][0] == "task"
    assert found["item 5: id typo"][0][0] == "conversations[1].valeu"
    assert found["item 6: id noimg"] == [
        ("conversations[0].value", "no [IMAGE256:...] token in the first human turn")
    ]
    assert "must be a JSON object" in found["item 7: id 7"][0][1]
    assert found["item 8: id swap"][0] == (
        "conversations[0].from",
        "expected 'human' (turns alternate human/gpt), got 'gpt'",
    )
    assert (
        found["item 9: id esc"][0][0] == "conversations[1].value"
        and "leaves the root" in found["item 9: id esc"][0][1]
    )


def test_ind_beyond_earlier_masks_is_reported(dataset: Path) -> None:
    item = json.loads(json.dumps(MR_ITEMS[0]))
    item["conversations"][6]["ind"] = 2
    (dataset / "ind.json").write_text(json.dumps([item]))
    result = load_dialogues(dataset / "ind.json")
    assert result.dialogues == []
    assert [(p.item, p.field, p.reason) for p in result.problems] == [
        ("item 0: id 0", "conversations[6].ind", "ind 2 must point to an earlier [MASK-DECODE] (0..1)")
    ]


def test_one_pretty_printed_item_reads_as_that_item(dataset: Path, tmp_path: Path) -> None:
    # The authors' data_sample.json is one item object over many lines, not a list (issue #27).
    item = json.loads((dataset / "mr.json").read_text())[0]
    single, listed = tmp_path / "data_sample.json", tmp_path / "listed.json"
    single.write_text(json.dumps(item, indent=4))
    listed.write_text(json.dumps([item]))
    assert detect(single) == "mrmedseg"
    one = load_dialogues(single, root=dataset)
    assert one.problems == [] and one.total == 1
    assert one.dialogues == load_dialogues(listed, root=dataset).dialogues


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'[{"conversations": [', "invalid JSON"),
        (b'[{"id": "\xff"}]', "not UTF-8"),
        (b'[{"id": 1}', "invalid JSON"),
    ],
)
def test_unreadable_mrmedseg_file_raises_naming_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_dialogues(path)
    assert caught.value.file == str(path) and reason in caught.value.reason


def test_missing_data_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_dialogues(tmp_path / "nothing.jsonl")


def test_kept_original_text_must_be_well_formed_in_jsonl(dataset: Path) -> None:
    record = jsonl_line("d1")
    record["rounds"][0]["mrmedseg"] = {"human": "text"}
    record["mrmedseg"] = {"itme": {}}
    result = load_dialogues(write_jsonl_lines(dataset / "kept.jsonl", [record]))
    assert sorted(p.field for p in result.problems) == ["mrmedseg", "rounds[0].mrmedseg"]
