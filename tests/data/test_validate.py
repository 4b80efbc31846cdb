"""validate(): file checks (missing, corrupt, empty, size, empty reference) and the statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dialogue_files import MR_ITEMS, box_mask, jsonl_line, write_jsonl_lines, write_png

from mediround.data.validate import validate


def test_valid_mrmedseg_file_passes_with_stats(dataset: Path) -> None:
    report = validate(dataset / "mr.json")
    assert report.ok and report.format == "mrmedseg"
    stats = report.stats
    assert (stats.dialogues, stats.valid, stats.rounds) == (2, 2, 5)
    assert stats.rounds_per_dialogue == {4: 1, 1: 1}
    assert stats.scenarios == {"-": 2} and stats.modalities == {"-": 2}


def test_file_problems_are_reported_per_dialogue(dataset: Path) -> None:
    (dataset / "masks" / "zero.png").write_bytes(b"")
    (dataset / "masks" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write_png(dataset / "masks" / "wide.png", box_mask(0, 0, 2, 2, height=4, width=7))
    write_png(dataset / "masks" / "empty.png", np.zeros((4, 6), dtype=np.uint8))

    def with_first_mask(dialogue_id: str, mask: str) -> dict:
        record = jsonl_line(dialogue_id)
        record["rounds"][0]["mask"] = mask
        return record

    no_ref = jsonl_line("unreferenced-empty")
    del no_ref["rounds"][1]["ref"]
    no_ref["rounds"][0]["mask"] = "masks/empty.png"
    lines = [
        jsonl_line("good", modality="MRI"),
        jsonl_line("missing-image", image="images/none.png"),
        with_first_mask("missing-mask", "masks/none.png"),
        with_first_mask("zero-byte", "masks/zero.png"),
        with_first_mask("corrupt", "masks/corrupt.png"),
        with_first_mask("wrong-size", "masks/wide.png"),
        with_first_mask("empty-reference", "masks/empty.png"),
        no_ref,
        '{"id": 3}',
    ]
    path = write_jsonl_lines(dataset / "files.jsonl", lines)
    report = validate(path)
    assert not report.ok
    stats = report.stats
    assert (stats.dialogues, stats.valid, stats.rounds) == (9, 2, 16)
    assert stats.modalities == {"MRI": 1, "CT": 7}
    found = {(p.item, p.field): p.reason for p in report.problems}
    assert all(p.file == str(path) for p in report.problems)
    assert set(found) == {
        ("line 2: id missing-image", "image"),
        ("line 3: id missing-mask", "rounds[0].mask"),
        ("line 4: id zero-byte", "rounds[0].mask"),
        ("line 5: id corrupt", "rounds[0].mask"),
        ("line 6: id wrong-size", "rounds[0].mask"),
        ("line 7: id empty-reference", "rounds[0].mask"),
        ("line 9", "id"),
        ("line 9", "image"),
        ("line 9", "rounds"),
    }
    assert found[("line 9", "image")] == "required field is missing"
    assert found[("line 2: id missing-image", "image")].endswith("images/none.png: file not found")
    assert "empty file (0 bytes)" in found[("line 4: id zero-byte", "rounds[0].mask")]
    assert "corrupt" in found[("line 5: id corrupt", "rounds[0].mask")]
    assert (
        found[("line 6: id wrong-size", "rounds[0].mask")]
        == "mask masks/wide.png is 7x4 but the image is 6x4"
    )
    assert (
        "is empty but a later round refers to round 1"
        in found[("line 7: id empty-reference", "rounds[0].mask")]
    )


def test_mrmedseg_file_problems_name_the_turn(dataset: Path) -> None:
    item = json.loads(json.dumps(MR_ITEMS[0]))
    item["conversations"][3]["value"] = item["conversations"][3]["value"].replace("s1_r01", "gone")
    item["conversations"][6]["value"] = item["conversations"][6]["value"].replace("s1_r01", "gone")
    (dataset / "gone.json").write_text(json.dumps([item, MR_ITEMS[1]]))
    report = validate(dataset / "gone.json")
    assert report.stats.valid == 1
    assert [(p.item, p.field) for p in report.problems] == [("item 0: id 0", "conversations[3].value")]


def test_check_files_false_skips_the_disk(dataset: Path) -> None:
    path = write_jsonl_lines(dataset / "nofiles.jsonl", [jsonl_line("d1", image="images/none.png")])
    assert validate(path, check_files=False).ok
    assert not validate(path).ok


def test_truncated_image_with_a_readable_header_is_reported(dataset: Path) -> None:
    data = (dataset / "images" / "s1.png").read_bytes()
    (dataset / "images" / "cut.png").write_bytes(data[: len(data) - 20])
    report = validate(write_jsonl_lines(dataset / "cut.jsonl", [jsonl_line("cut", image="images/cut.png")]))
    assert [(p.item, p.field) for p in report.problems] == [("line 1: id cut", "image")]
    assert "corrupt image" in report.problems[0].reason
