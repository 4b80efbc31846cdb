"""``mediround eval`` as CI reads it: JUnit XML (read back with junitparser), the Markdown summary,
``--write-baseline``, and subgroup scopes, on a small synthetic set with hand-made predictions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from junitparser import Failure, JUnitXml, Skipped

from mediround.data.formats import load_dialogues
from mediround.data.images import load_mask
from mediround.data.predictions import PredictionWriter
from mediround.data.synth import generate
from mediround.metrics import METRIC_LABELS, METRICS, aggregate
from mediround.reports.gate import scope_groups
from mediround.reports.rows import read_rows
from mediround_cli.main import cli

ALL_SCOPES = "overall,round,modality,scenario"


def _run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def _predict(data: Path, folder: Path, emptied: set[tuple[str, int]] = frozenset()) -> None:
    """Each ground-truth mask shifted down by 0-2 pixels (by dialogue), as the prediction; ``emptied``
    (dialogue id, round) pairs predicted empty."""
    with PredictionWriter(folder) as writer:
        for index, dialogue in enumerate(load_dialogues(data).dialogues):
            for number in range(1, len(dialogue.rounds) + 1):
                mask = np.roll(load_mask(dialogue.mask_path(number)), index % 3, axis=0)
                writer.write(dialogue.id, number, np.zeros_like(mask) if (dialogue.id, number) in emptied else mask)


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> tuple[Path, Path, Path]:
    """8 synthetic test dialogues, their shifted-mask predictions, and those predictions' metrics as the
    baseline."""
    folder = tmp_path_factory.mktemp("ci-reports")
    data = generate(folder / "data", 8, seed=3, split="test", image_size=64).files["test"]
    _predict(data, folder / "predictions")
    baseline = folder / "baseline.parquet"
    assert _run(data, "--predictions", folder / "predictions", "--out", baseline).exit_code == 0
    return data, folder / "predictions", baseline


def _regressed(synth_set, tmp_path) -> tuple[Path, set[str]]:
    """Predictions whose round 1 is empty for the dialogues of the first dialogue's modality, and the
    scopes those rounds belong to."""
    data, _, _ = synth_set
    dialogues = load_dialogues(data).dialogues
    hit = [d for d in dialogues if d.modality == dialogues[0].modality]
    folder = tmp_path / "worse"
    _predict(data, folder, emptied={(d.id, 1) for d in hit})
    return folder, {"overall", "round 1", f"modality {dialogues[0].modality}", *(f"scenario {d.scenario}" for d in hit)}


def _cases(path: Path) -> list:
    xml = JUnitXml.fromfile(str(path))
    [suite] = list(xml)
    return list(suite)


def test_junit_xml_has_the_structure_ci_systems_read_and_a_pass_fails_nothing(synth_set, tmp_path):
    data, predictions, baseline = synth_set
    junit = tmp_path / "reports" / "junit.xml"
    result = _run(data, "--predictions", predictions, "--out", tmp_path / "m.parquet", "--baseline", baseline,
                  "--max-drop", "0", "--gate-scopes", ALL_SCOPES, "--junit-xml", junit)
    assert result.exit_code == 0, result.output
    root = JUnitXml.fromfile(str(junit))
    assert isinstance(root, JUnitXml)  # junitparser reads a <testsuites> root as JUnitXml, a bare suite as TestSuite
    [suite] = list(root)
    assert suite.name == "mediround eval gate"
    cases = list(suite)
    scopes = scope_groups(read_rows(baseline), ALL_SCOPES.split(","))
    score_names = {f"{scope} {METRIC_LABELS[metric]}" for scope in scopes for metric in METRICS}
    assert {case.name for case in cases if case.classname == "mediround.gate.scores"} == score_names
    assert [case.name for case in cases if case.classname == "mediround.gate.coverage"] == [
        "skipped dialogues", "(dialogue, round) pairs", "dialogue ids", "predictions matched"]
    assert suite.tests == len(cases) == len(score_names) + 4
    assert suite.failures == 0 and all(case.is_passed for case in cases)
    properties = {prop.name: prop.value for prop in suite.properties()}
    assert len(properties["scored_data_sha256"]) == 64 and properties["gate.mediround_version"]
    assert properties["gate.baseline"] == str(baseline) and properties["gate.scopes"] == ALL_SCOPES


def test_a_forced_regression_fails_exactly_the_scores_of_the_groups_it_touches(synth_set, tmp_path):
    data, _, baseline = synth_set
    worse, touched = _regressed(synth_set, tmp_path)
    junit = tmp_path / "junit.xml"
    result = _run(data, "--predictions", worse, "--baseline", baseline, "--max-drop", "0.5",
                  "--gate-scopes", ALL_SCOPES, "--junit-xml", junit)
    assert result.exit_code == 1, result.output
    cases = _cases(junit)
    failed = {case.name: case.result[0] for case in cases if not case.is_passed}
    assert set(failed) == {f"{scope} {METRIC_LABELS[metric]}" for scope in touched for metric in METRICS}
    assert all(isinstance(failure, Failure) for failure in failed.values())
    message = failed["round 1 Dice"].message
    values = dict(re.findall(r"(baseline|current|drop) (-?\d+\.\d\d)", message))
    assert float(values["baseline"]) - float(values["current"]) == pytest.approx(float(values["drop"]), abs=0.011)
    assert float(values["drop"]) > 0.5 and "--max-drop 0.5" in message


def test_coverage_failures_are_their_own_failed_cases(synth_set, tmp_path):
    data, predictions, baseline = synth_set
    first_four = tmp_path / "four.jsonl"
    first_four.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    junit = tmp_path / "junit.xml"
    result = _run(first_four, "--predictions", predictions, "--root", data.parent, "--baseline", baseline,
                  "--max-drop", "100", "--junit-xml", junit)
    assert result.exit_code == 1, result.output
    failed = {case.name: case.result[0].message for case in _cases(junit) if not case.is_passed}
    assert set(failed) == {"(dialogue, round) pairs", "dialogue ids"}  # no score can fall 100 points
    assert "only in the baseline" in failed["dialogue ids"]


def test_the_markdown_summary_shows_the_parquet_numbers_with_regressions_first(synth_set, tmp_path):
    data, _, baseline = synth_set
    worse, touched = _regressed(synth_set, tmp_path)
    summary, rows_file = tmp_path / "summary.md", tmp_path / "rows.parquet"
    result = _run(data, "--predictions", worse, "--out", rows_file, "--baseline", baseline, "--max-drop", "0.5",
                  "--gate-scopes", ALL_SCOPES, "--summary-md", summary, "--plot", tmp_path / "curve.png")
    assert result.exit_code == 1, result.output
    text = summary.read_text()
    assert text.startswith("### MediRound eval: gate failed")
    table = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")][1:]
    shown = {(cells[1].strip(), cells[2].strip()): [cell.strip() for cell in cells] for cells in table}
    current = scope_groups(read_rows(rows_file), ALL_SCOPES.split(","))
    before = scope_groups(read_rows(baseline), ALL_SCOPES.split(","))
    assert len(shown) == len(table) == 3 * len(current)
    for scope, rows in current.items():
        for metric in METRICS:
            cells = shown[(scope, METRIC_LABELS[metric])]
            now, then = aggregate(rows).points(metric), aggregate(before[scope]).points(metric)
            assert cells[4:7] == [f"{then:.2f}", f"{now:.2f}", f"{then - now:.2f}"]
            assert cells[0] == ("**fail**" if scope in touched else "pass")
    verdicts = [cells[0] for cells in table]
    assert verdicts == sorted(verdicts, key=lambda verdict: verdict != "**fail**")
    assert "![Score per round](curve.png)" in text


def test_summary_to_stdout_carries_only_the_markdown(synth_set, tmp_path):
    data, predictions, baseline = synth_set
    result = CliRunner().invoke(cli, ["eval", str(data), "--predictions", str(predictions), "--out",
                                      str(tmp_path / "m.parquet"), "--baseline", str(baseline), "--confidence", "0.9",
                                      "--summary-md", "-"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("### MediRound eval: gate passed")
    assert "90% interval of the drop" in result.stdout and "| pass | overall | Dice |" in result.stdout
    assert "Overall" not in result.stdout and "gate passed: same coverage" in result.stderr


def test_write_baseline_writes_on_a_pass_and_refuses_on_a_fail(synth_set, tmp_path):
    data, predictions, baseline = synth_set
    first = tmp_path / "first.parquet"
    made = _run(data, "--predictions", predictions, "--out", tmp_path / "m.parquet", "--write-baseline", first)
    assert made.exit_code == 0 and "next baseline written" in made.output  # no --baseline: nothing skipped
    assert read_rows(first) == read_rows(baseline)

    worse, _ = _regressed(synth_set, tmp_path)
    refused = _run(data, "--predictions", worse, "--baseline", first, "--max-drop", "0.5", "--write-baseline", first)
    assert refused.exit_code == 1, refused.output
    assert "next baseline not written" in refused.output and read_rows(first) == read_rows(baseline)
    kept = _run(data, "--predictions", worse, "--baseline", first, "--max-drop", "100", "--write-baseline",
                tmp_path / "next.parquet")
    assert kept.exit_code == 0 and read_rows(tmp_path / "next.parquet") == read_rows(worse / "metrics.parquet")


def test_the_statistical_gate_passes_a_drop_it_cannot_tell_from_noise_and_says_why(synth_set, tmp_path):
    """Round 1 of 2 of 8 dialogues emptied: overall Dice falls 7.4 points, but a resample without those two
    dialogues is as likely as one with them, so the interval reaches 0; the plain threshold fails it."""
    data, _, baseline = synth_set
    worse, _ = _regressed(synth_set, tmp_path)
    junit = tmp_path / "junit.xml"
    gate = ["--baseline", baseline, "--max-drop", "0.5", "--gate-scopes", "overall,modality", "--min-group-size", "3"]
    plain = _run(data, "--predictions", worse, *gate)
    assert plain.exit_code == 1 and "overall" in plain.output
    result = _run(data, "--predictions", worse, *gate, "--confidence", "0.95", "--junit-xml", junit)
    assert result.exit_code == 0, result.output
    assert "Gate (x100 points)" in result.output and "95% interval" in result.output
    cases = {case.name: case for case in _cases(junit)}
    overall = cases["overall Dice"]
    assert overall.is_passed and "drop 7.41, 95% interval 0.00 to 15.38 not all above --max-drop 0.5" in overall.system_out
    [skipped] = cases["modality CT Dice"].result
    assert isinstance(skipped, Skipped) and "drop 20.00" in skipped.message
    assert "reported, not gated: 2 dialogue(s), fewer than the minimum group size 3" in skipped.message
