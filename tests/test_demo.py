"""``mediround demo`` end to end with the shipped model: data, predictions, overlays, rows and the HTML page."""

from __future__ import annotations

import html
from pathlib import Path

from click.testing import CliRunner

from mediround.data.formats import load_dialogues
from mediround.data.predictions import safe_name
from mediround.reports.rows import read_rows
from mediround_cli.main import cli


def _demo(out: Path, *args: str):
    return CliRunner().invoke(cli, ["demo", "--out", str(out), *args], catch_exceptions=False)


def test_demo_writes_report_overlays_and_per_round_rows(tmp_path):
    out = tmp_path / "demo"
    result = _demo(out, "--dialogues", "2")
    assert result.exit_code == 0, result.output
    assert "no --model given: using the shipped tiny model" in result.output and "Per round" in result.output

    dialogues = load_dialogues(out / "data" / "test.jsonl").dialogues
    assert len(dialogues) == 2
    rows = read_rows(out / "rounds.parquet")
    assert sorted((r["dialogue_id"], r["round"]) for r in rows) == sorted(
        (d.id, n) for d in dialogues for n in range(1, len(d.rounds) + 1))
    assert {r["beta"] for r in rows} == {0.6} and {r["references"] for r in rows} == {"predicted"}
    assert sorted(p.name for p in (out / "predictions" / "overlays").glob("*.png")) == sorted(
        f"{safe_name(d.id)}.png" for d in dialogues)
    assert (out / "round_curve.png").read_bytes().startswith(b"\x89PNG")

    page = (out / "index.html").read_text()
    for dialogue in dialogues:
        assert f"src='predictions/overlays/{safe_name(dialogue.id)}.png'" in page
        assert all(html.escape(r.query) in page for r in dialogue.rounds)
    for row in rows:
        assert f'<td class="num">{100 * row["dice"]:.1f}</td>' in page


def test_demo_replaces_an_earlier_demo_and_refuses_a_foreign_folder(tmp_path):
    out = tmp_path / "demo"
    assert _demo(out, "--dialogues", "2", "--beta", "off").exit_code == 0
    assert _demo(out, "--dialogues", "1", "--beta", "off").exit_code == 0
    assert len(list((out / "predictions" / "overlays").glob("*.png"))) == 1
    assert {r["beta"] for r in read_rows(out / "rounds.parquet")} == {None}

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = _demo(foreign, "--dialogues", "1")
    assert result.exit_code == 2 and "holds no earlier demo" in result.output
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
