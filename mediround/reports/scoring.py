"""Predictions folder + ground truth -> metric rows (Parquet) -> summary, plot and regression gate.

``evaluate_predictions`` is the one scoring path: ``mediround eval --predictions DIR`` calls it, and
``score_run`` calls it for every track folder of an ``infer`` run (``mediround infer``, model-based
evaluation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mediround.data.dialogue import Dialogue
from mediround.data.formats import LoadResult, load_dialogues
from mediround.data.images import load_mask
from mediround.data.predictions import PREDICTIONS_FILE, read_predictions, read_predictions_if_any
from mediround.data.run_manifest import MANIFEST_FILE, check_data_matches, data_sha256, read_manifest
from mediround.error_log import ERRORS_FILE, read_error_log
from mediround.errors import DataError
from mediround.metrics import Scores, pair_counts, summarize
from mediround.reports.gate import GateReport, GateSettings, read_baseline, run_gate
from mediround.reports.plots import round_curve
from mediround.reports.rows import REFERENCES, read_run_metadata, write_rows


@dataclass
class ScoreResult:
    """Rows (one per scored round), problems (skipped dialogues and rounds, bad prediction masks),
    the ``(dialogue id, round)`` pairs that had no usable prediction and were scored as empty, and the
    number of predictions that match no round of the data (a sign of the wrong data file), and the number
    of dialogues skipped whole."""

    rows: list[dict]
    problems: list[DataError] = field(default_factory=list)
    missing: list[tuple[str, int]] = field(default_factory=list)
    unmatched: int = 0
    skipped: int = 0


def _prediction_mask(
    record: dict | None, predictions_dir: Path, shape: tuple[int, int], problems: list[DataError]
) -> np.ndarray | None:
    """The predicted mask, or None (recorded as a problem unless the record is simply absent)."""
    if record is None:
        return None
    path = predictions_dir / record["mask"]
    try:
        mask = load_mask(path)
    except DataError as error:
        problems.append(DataError(str(predictions_dir / PREDICTIONS_FILE), f"{record['id']} round {record['round']}",
                                  "mask", f"{record['mask']}: {error.reason}"))
        return None
    if mask.shape != shape:
        problems.append(DataError(str(path), f"{record['id']} round {record['round']}", "mask",
                                  f"size {mask.shape[1]}x{mask.shape[0]} differs from the ground truth "
                                  f"{shape[1]}x{shape[0]}"))
        return None
    return mask


def _score_dialogue(
    dialogue: Dialogue, records: dict[tuple[str, int], dict], predictions_dir: Path, result: ScoreResult
) -> None:
    rows: list[dict] = []
    missing: list[tuple[str, int]] = []
    problems: list[DataError] = []
    for number, round_ in enumerate(dialogue.rounds, start=1):
        gt_path = dialogue.mask_path(number)
        if gt_path is None:
            problems.append(DataError(dialogue.id, f"round {number}", "mask", "no ground-truth mask; round not scored"))
            continue
        gt = load_mask(gt_path)
        record = records.get((dialogue.id, number))
        pred = _prediction_mask(record, predictions_dir, gt.shape, problems)
        is_missing = pred is None
        if is_missing:
            missing.append((dialogue.id, number))
            pred = np.zeros_like(gt)
        mask_counts = pair_counts(pred, gt)
        record = record or {}
        rows.append(
            {
                "dialogue_id": dialogue.id,
                "round": number,
                "ref_round": round_.ref,
                "scenario": dialogue.scenario,
                "modality": dialogue.modality,
                "difficulty": round_.difficulty or dialogue.difficulty,
                "dialogue_difficulty": dialogue.difficulty,
                "round_difficulty": round_.difficulty,
                "names_target": round_.names_target,
                "entity": round_.entity,
                "intersection": mask_counts.intersection,
                "union": mask_counts.union,
                "pred_area": mask_counts.pred_area,
                "gt_area": mask_counts.gt_area,
                "iou": mask_counts.iou,
                "dice": mask_counts.dice,
                "missing": is_missing,
                "jcm_score": record.get("jcm_score"),
                "refined": record.get("refined"),
            }
        )
    result.rows.extend(rows)
    result.missing.extend(missing)
    result.problems.extend(problems)


def score_predictions(
    dialogues: Sequence[Dialogue],
    predictions_dir: str | os.PathLike,
    advance: Callable[[], None] | None = None,
) -> ScoreResult:
    """Score every round of ``dialogues`` against the predictions folder.

    A round without a usable prediction (absent, unreadable, wrong size) is scored as an empty mask,
    flagged ``missing`` and listed in ``ScoreResult.missing``. A dialogue whose ground truth cannot be
    read is skipped whole and reported in ``problems``. ``advance`` is called once per dialogue.
    """
    directory = Path(predictions_dir)
    records = read_predictions(directory)
    result = ScoreResult(rows=[])
    for dialogue in dialogues:
        try:
            _score_dialogue(dialogue, records, directory, result)
        except DataError as error:
            result.problems.append(DataError(error.file, dialogue.id, error.field, f"dialogue skipped: {error.reason}"))
            result.skipped += 1
        if advance is not None:
            advance()
    known = {(dialogue.id, number) for dialogue in dialogues for number in range(1, len(dialogue.rounds) + 1)}
    result.unmatched = len(records.keys() - known)
    return result


METRICS_FILE = "metrics.parquet"
"""The metric rows of a predictions folder, written beside its predictions."""
SCORED_DATA_KEY = "scored_data_sha256"
"""Metadata key of a metrics file: the SHA-256 of the data its rows were scored against."""


def check_replaceable(out: str | os.PathLike, scored_data_sha256: str | None) -> None:
    """Refuse to replace a metrics file scored against other data than the data of SHA-256
    ``scored_data_sha256`` (or against unknown data, or when that is None)."""
    if not Path(out).exists():
        return
    earlier = read_run_metadata(out) or {}
    if scored_data_sha256 is None or earlier.get(SCORED_DATA_KEY) != scored_data_sha256:
        raise DataError(str(out), None, None, "already holds the metrics of other data or of an unknown run; "
                        "pass --overwrite to replace it, or --out to write elsewhere")


@dataclass
class ScoringInputs:
    """What ``mediround eval --predictions DIR`` scores: the data (given, or the one the run manifest
    names) and its dialogues, the manifest with that data's hash added, the track the folder holds (when
    it holds one), and how many dialogues ``infer`` skipped (listed in its errors.jsonl)."""

    data: Path
    loaded: LoadResult
    manifest: dict
    beta: float | None
    references: str | None
    skipped_by_infer: int


def scoring_inputs(
    predictions_dir: str | os.PathLike, data: str | os.PathLike | None, force: bool,
    root: str | os.PathLike | None = None, allow_outside_root: bool = False,
) -> ScoringInputs:
    """Read the predictions folder's run manifest (required without ``data``), load ``data`` (paths under
    ``root``) and check it against the manifest (``DataError`` when the SHA-256 of the data file or of the
    images and masks it names differs, unless ``force``), before anything is written."""
    folder = Path(predictions_dir)
    has_manifest = (folder / MANIFEST_FILE).is_file()
    manifest = read_manifest(folder) if has_manifest or data is None else {}
    data = Path(data) if data is not None else Path(manifest["data"])
    if not data.exists():
        raise DataError(str(data), None, None, f"the data named by {folder / MANIFEST_FILE} is not there; give DATA")
    loaded = load_dialogues(data, root=root, allow_outside_root=allow_outside_root)
    if manifest:
        digest = check_data_matches(manifest, folder, data, loaded.dialogues, force)["data_sha256"]
    else:
        digest = data_sha256(data)
    betas, forced = manifest.get("betas", []), manifest.get("teacher_forcing", [])
    single = len(betas) == 1 and len(forced) == 1
    skipped = sum(1 for record in read_error_log(folder / ERRORS_FILE) if record.get("id") is not None)
    return ScoringInputs(
        data=data,
        loaded=loaded,
        manifest={**manifest, "scored_data": str(data.resolve()), SCORED_DATA_KEY: digest},
        beta=betas[0] if single else None,
        references=REFERENCES[bool(forced[0])] if single else None,
        skipped_by_infer=skipped,
    )


def write_passed_baseline(path: str | os.PathLike | None, gate: GateReport, rows: Sequence[dict],
                          manifest: dict | None) -> Path | None:
    """Write ``rows`` to ``path`` as the next baseline when ``gate`` passed (with a baseline: no score fell
    and the coverage held; without: nothing was skipped); the path written, or None."""
    if path is None or not gate.passed:
        return None
    write_rows(path, rows, manifest)
    return Path(path)


@dataclass
class EvalConfig:
    """What to do after scoring: where to write rows, which baseline to gate against and how (``gate``),
    where to plot, the track the predictions come from (``beta``, ``references``: written into every row)
    and the run ``manifest`` of the predictions (the rows' file metadata). ``skipped``: dialogues already
    skipped before scoring (unreadable in the data file, or not predicted); they fail the gate as the
    scoring's own do."""

    out: Path | None = None
    baseline: Path | None = None
    gate: GateSettings = field(default_factory=GateSettings)
    plot: Path | None = None
    beta: float | None = None
    references: str | None = None
    manifest: dict | None = None
    skipped: int = 0
    overwrite: bool = False
    """Replace an ``out`` file that holds the metrics of other data (refused otherwise)."""
    write_baseline: Path | None = None
    """Also write the rows here, as the next baseline, when the gate passes (``write_passed_baseline``)."""


@dataclass
class Evaluation:
    """Everything an evaluation produced; the CLI renders it."""

    rows: list[dict]
    summary: dict[str, dict[Any, Scores]]
    problems: list[DataError]
    missing: list[tuple[str, int]]
    unmatched: int = 0
    skipped: int = 0
    """Dialogues skipped before or during scoring."""
    gate: GateReport | None = None
    """The gate's verdict: against ``EvalConfig.baseline``, or, without one, on skipped dialogues only."""
    out: Path | None = None
    plot: Path | None = None
    baseline_written: Path | None = None
    """``EvalConfig.write_baseline`` when the gate passed and the rows were written there."""


def evaluate_predictions(
    dialogues: Sequence[Dialogue],
    predictions_dir: str | os.PathLike,
    config: EvalConfig,
    advance: Callable[[], None] | None = None,
) -> Evaluation:
    """Score a predictions folder, write the rows, draw the per-round curve, gate against a baseline, and
    write the rows as the next baseline when asked and the gate passed.

    Raises ``DataError`` when nothing could be scored (no rows) since there is no score to report, and,
    before scoring, when ``config.out`` holds metrics of other data than ``config.manifest``'s
    ``scored_data_sha256`` (or of unknown data) and ``config.overwrite`` is not set.
    """
    if config.out is not None and not config.overwrite:
        check_replaceable(config.out, (config.manifest or {}).get(SCORED_DATA_KEY))
    scored = score_predictions(dialogues, predictions_dir, advance=advance)
    for row in scored.rows:
        row.update(beta=config.beta, references=config.references)
    if not scored.rows:
        raise DataError(str(predictions_dir), None, None, "no round could be scored (no dialogue with ground truth)")
    evaluation = Evaluation(rows=scored.rows, summary=summarize(scored.rows), problems=scored.problems,
                            missing=scored.missing, unmatched=scored.unmatched, skipped=config.skipped + scored.skipped)
    # Before writing: the baseline may be the very file this run is about to replace.
    baseline_rows = read_baseline(config.baseline) if config.baseline is not None else None
    evaluation.gate = run_gate(scored.rows, baseline_rows, evaluation.skipped, config.gate, config.baseline)
    if config.out is not None:
        write_rows(config.out, scored.rows, config.manifest)
        evaluation.out = Path(config.out)
    evaluation.baseline_written = write_passed_baseline(config.write_baseline, evaluation.gate, scored.rows,
                                                        config.manifest)
    if config.plot is not None:
        round_curve(evaluation.summary["round"], config.plot)
        evaluation.plot = Path(config.plot)
    return evaluation


@dataclass(frozen=True)
class TrackFolder:
    """One track of an ``infer`` run as scoring sees it: its label, its predictions folder, and what its
    rows record (``beta``, ``references``)."""

    label: str
    folder: Path
    beta: float | None
    references: str


def run_scored_manifest(run_folder: str | os.PathLike) -> dict:
    """The run manifest of the ``infer`` run folder ``run_folder``, plus the data its predictions are scored
    against (the run's own): the file metadata of its metric rows."""
    manifest = json.loads((Path(run_folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    return {**manifest, "scored_data": manifest["data"], SCORED_DATA_KEY: manifest["data_sha256"]}


def score_run(
    data: str | os.PathLike,
    tracks: Sequence[TrackFolder],
    run_folder: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> dict[str, Evaluation]:
    """Score each track of the ``infer`` run in ``run_folder`` against the ground truth of ``data`` (paths
    under ``root``), writing ``metrics.parquet`` into each track folder.

    Only dialogues that were predicted are scored (skipped ones are in ``errors.jsonl``). Returns
    ``{track label: Evaluation}``; empty when no predicted dialogue carries a ground-truth mask.
    """
    loaded = load_dialogues(data, root=root, allow_outside_root=allow_outside_root)
    with_truth = [d for d in loaded.dialogues if any(r.mask is not None for r in d.rounds)]
    manifest = run_scored_manifest(run_folder)
    evaluations = {}
    for track in tracks:
        predicted = {dialogue_id for dialogue_id, _ in read_predictions_if_any(track.folder)}
        scored = [d for d in with_truth if d.id in predicted]
        if scored:
            scoring = EvalConfig(out=track.folder / METRICS_FILE, beta=track.beta, references=track.references,
                                 manifest=manifest)
            evaluations[track.label] = evaluate_predictions(scored, track.folder, scoring)
    return evaluations
