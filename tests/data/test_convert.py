"""convert() and the validate/convert commands: path rewriting, SA-Med2D folders, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from dialogue_files import MR_ITEMS, jsonl_line, write_jsonl_lines

from mediround.data.formats import load_dialogues
from mediround.data.formats.convert import convert
from mediround.data.formats.samed2d import class_from_mask_name, modality_from_name
from mediround.data.validate import validate
from mediround_cli.common import SKIPPED_EXIT_CODE
from mediround_cli.main import cli


def test_cli_round_trip_through_another_folder_restores_the_file(dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    elsewhere = tmp_path / "elsewhere" / "mr.jsonl"
    first = runner.invoke(cli, ["convert", str(dataset / "mr.json"), str(elsewhere)])
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in elsewhere.read_text().splitlines()]
    assert lines[0]["image"] == "../data/images/s1.png"
    assert "outside" in first.output
    assert validate(elsewhere, allow_outside_root=True).ok
    refused = runner.invoke(cli, ["convert", str(elsewhere), str(dataset / "refused.json")])
    assert refused.exit_code == SKIPPED_EXIT_CODE and "leaves the root" in refused.output
    back = runner.invoke(cli, ["convert", str(elsewhere), str(dataset / "back.json"), "--allow-outside-root"])
    assert back.exit_code == 0, back.output
    assert json.loads((dataset / "back.json").read_text()) == MR_ITEMS


def test_convert_inside_the_data_folder_keeps_paths_and_validates(dataset: Path) -> None:
    result = convert(dataset / "mr.json", dataset / "lists" / ".." / "mr.jsonl")
    assert (result.source_format, result.target_format, result.written, result.total) == (
        "mrmedseg",
        "jsonl",
        2,
        2,
    )
    assert result.outside_output_folder == 0
    assert validate(dataset / "mr.jsonl").ok
    result = convert(dataset / "mr.json", dataset / "lists" / "mr.jsonl")
    assert (
        load_dialogues(dataset / "lists" / "mr.jsonl", allow_outside_root=True).dialogues[0].image
        == "../images/s1.png"
    )


def test_convert_skips_bad_dialogues_and_exits_3(dataset: Path) -> None:
    source = write_jsonl_lines(dataset / "mixed.jsonl", [jsonl_line("ok"), "not json"])
    result = CliRunner().invoke(cli, ["convert", str(source), str(dataset / "out.json")])
    assert result.exit_code == SKIPPED_EXIT_CODE
    assert f"{source}: line 2: invalid JSON" in result.output
    assert [item["id"] for item in json.loads((dataset / "out.json").read_text())] == ["ok"]


def test_convert_needs_a_known_output_extension(dataset: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(dataset / "mr.json"), str(dataset / "out.txt")])
    assert result.exit_code == 2
    assert "give --to jsonl|mrmedseg" in result.output
    assert "Traceback" not in result.output
    explicit = CliRunner().invoke(
        cli, ["convert", str(dataset / "mr.json"), str(dataset / "out.txt"), "--to", "jsonl"]
    )
    assert explicit.exit_code == 0 and load_dialogues(dataset / "out.txt").format == "jsonl"


def test_validate_command_prints_problems_and_summary(dataset: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(cli, ["validate", str(dataset / "mr.json")])
    assert good.exit_code == 0, good.output
    assert "dialogues with 4 rounds" in good.output and "all dialogues valid" in good.output
    bad = write_jsonl_lines(dataset / "bad.jsonl", [jsonl_line("ok"), jsonl_line("x", image="../../etc.png")])
    result = runner.invoke(cli, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: line 2: id x: field 'image': path '../../etc.png' leaves the root" in result.output
    assert "1 dialogue(s) invalid" in result.output
    allowed = runner.invoke(cli, ["validate", str(bad), "--allow-outside-root"])
    assert allowed.exit_code == 1 and "file not found" in allowed.output


def test_validate_command_on_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('[{"conversations": [')
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}: invalid JSON" in result.output and "Traceback" not in result.output


def test_mask_names_give_class_and_modality() -> None:
    assert class_from_mask_name("amos_0004_75_inferior_vena_cava_000", "amos_0004_75") == "inferior vena cava"
    assert class_from_mask_name("s0114_111_rib_left_9_000", "s0114_111") == "rib left 9"
    assert class_from_mask_name("ct_00--case--x_0040--0000_001", "ct_00--case--x_0040") is None
    assert class_from_mask_name("other_liver_000", "amos_0004_75") is None
    assert modality_from_name("amos_0004_75") == "CT" and modality_from_name("amos_0507_31") == "MRI"
    assert modality_from_name("ct_00--AbdomenCT1K--Case_00011--x_0040") == "CT"
    assert modality_from_name("mr_t1--BraTS--x") == "MRI"
    assert modality_from_name("s0114_111") is None


def test_sa_med2d_demo_becomes_single_round_dialogues(tmp_path: Path, shared_data) -> None:
    demo = shared_data("sam-med2d-demo")
    loaded = load_dialogues(demo)
    assert loaded.format == "sa-med2d" and loaded.problems == []
    masks = {path.name for path in (demo / "data_demo" / "masks").glob("*.png")}
    assert {Path(d.rounds[0].mask).name for d in loaded.dialogues} == masks
    by_id = {d.id: d for d in loaded.dialogues}
    liver = by_id["amos_0004_75_liver_000"]
    assert liver.image == "data_demo/images/amos_0004_75.png" and liver.modality == "CT"
    assert (liver.rounds[0].query, liver.rounds[0].answer, liver.rounds[0].entity) == (
        "Segment the liver.",
        "It is [SEG].",
        "liver",
    )
    assert by_id["s0114_111_heart_atrium_left_000"].rounds[0].query == "Segment the heart atrium left."
    output = tmp_path / "samed2d.jsonl"
    result = CliRunner().invoke(cli, ["convert", str(demo), str(output), "--from", "sa-med2d", "--single-round"])
    assert result.exit_code == 0, result.output
    report = validate(output, allow_outside_root=True)
    assert report.ok, [p.one_line() for p in report.problems]
    assert (report.stats.dialogues, report.stats.valid, report.stats.rounds) == (
        len(masks),
        len(masks),
        len(masks),
    )
    assert report.stats.modalities["CT"] == sum(1 for name in masks if name.startswith("amos_0"))


def test_convert_refuses_an_existing_output_even_its_own_input_without_overwrite(dataset: Path) -> None:
    source = write_jsonl_lines(dataset / "own.jsonl", [jsonl_line("ok")])
    before = source.read_bytes()
    itself = CliRunner().invoke(cli, ["convert", str(source), str(source)])
    assert itself.exit_code == 2 and "is SOURCE itself" in itself.output and "--overwrite" in itself.output
    assert source.read_bytes() == before
    target = dataset / "target.json"
    target.write_text("keep me")
    refused = CliRunner().invoke(cli, ["convert", str(source), str(target)])
    assert refused.exit_code == 2 and target.read_text() == "keep me"
    replaced = CliRunner().invoke(cli, ["convert", str(source), str(target), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert [item["id"] for item in json.loads(target.read_text())] == ["ok"]


def test_sa_med2d_conversion_validates_without_allow_outside_root(shared_data, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    output = Path("converted") / "dialogues.jsonl"
    converted = CliRunner().invoke(cli, ["convert", str(shared_data("sam-med2d-demo")), str(output),
                                         "--from", "sa-med2d"])
    assert converted.exit_code == 0, converted.output
    checked = CliRunner().invoke(cli, ["validate", str(tmp_path / output)])
    assert checked.exit_code == 0 and "all dialogues valid" in checked.output, checked.output
