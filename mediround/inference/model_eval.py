"""Model-based evaluation: run Algorithm 1 for one or more tracks in one pass, score each, compare.

Tracks are the JCM thresholds (``--beta 0.2,0.4,0.6,0.8``; ``off`` allowed) crossed with the reference
source (predicted masks, ground-truth masks with ``--teacher-forcing``, both with ``--compare-tf``). All
tracks of a dialogue run in one pass that shares the image encoders and, as long as their inputs agree,
the text model's state (see ``mediround.inference.chain``); each track gets its own predictions folder.

Rows: every track's rows go to one Parquet file (``mediround.reports.rows``: the one schema, whose ``beta``
and ``references`` columns tell the tracks apart); each track folder also holds its own ``metrics.parquet``
(usable as a baseline). The regression gate compares the primary track (the first beta; predicted
references unless only teacher forcing was asked for) with the baseline rows of the same beta and
references when the baseline says which (older files may hold nulls there), else with all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mediround.data.run_manifest import data_sha256
from mediround.errors import DataError
from mediround.inference.chain import Track
from mediround.inference.events import InferenceEvents
from mediround.inference.runner import InferenceSummary, run_inference
from mediround.inference.settings import InferenceConfig
from mediround.metrics import Scores, aggregate, group_scores, summarize
from mediround.reports.beta_curve import beta_curve
from mediround.reports.gate import GateReport, run_gate
from mediround.reports.plots import round_curve
from mediround.reports.rows import read_rows, write_rows
from mediround.reports.scoring import (
    METRICS_FILE,
    EvalConfig,
    check_replaceable,
    run_scored_manifest,
    score_run,
    write_passed_baseline,
)


@dataclass
class ModelEvalConfig:
    """A model-based evaluation: the inference run (every track in one pass), then what to do with the
    scores (``scoring.out``: the rows of every track; ``scoring.plot``: the primary track's per-round
    curve; ``scoring.baseline``/``gate``: the gate; ``scoring.write_baseline``: where the rows go as the
    next baseline when it passes), and where to draw the beta-vs-score curve."""

    inference: InferenceConfig
    scoring: EvalConfig = field(default_factory=EvalConfig)
    beta_plot: Path | None = None


@dataclass
class RoundGap:
    """Per round: the score with predicted references, with ground-truth references, and their gap (x100)."""

    round: int
    predicted: Scores
    teacher_forced: Scores

    def gap(self, metric: str) -> float:
        return self.teacher_forced.points(metric) - self.predicted.points(metric)


@dataclass
class ModelEvaluation:
    """What ``evaluate_model`` produced: the inference summary, per-track summaries and rows, comparisons."""

    inference: InferenceSummary
    tracks: list[Track]
    primary: Track
    summaries: dict[Track, dict[str, dict[Any, Scores]]]
    rows: list[dict]
    out: Path
    problems: list[DataError] = field(default_factory=list)
    missing: list[tuple[str, int]] = field(default_factory=list)
    """Rounds of the primary track without a usable prediction (scored as empty)."""
    tf_gap: list[RoundGap] = field(default_factory=list)
    beta_plot: Path | None = None
    round_plot: Path | None = None
    gate: GateReport | None = None
    """The gate's verdict on the primary track (without a baseline: on skipped dialogues only)."""
    manifest: dict = field(default_factory=dict)
    """The run manifest the rows were written with (``run_scored_manifest``)."""
    baseline_written: Path | None = None


def primary_track(tracks: Sequence[Track]) -> Track:
    """The track the gate and the headline tables use: first beta, predicted references when present."""
    predicted = [t for t in tracks if not t.teacher_forcing]
    return (predicted or list(tracks))[0]


def round_gaps(predicted_rows: Sequence[dict], forced_rows: Sequence[dict]) -> list[RoundGap]:
    """Per-round scores with predicted vs ground-truth references: the cost of error propagation."""
    predicted = group_scores(predicted_rows, "round")
    forced = group_scores(forced_rows, "round")
    return [RoundGap(number, predicted[number], forced[number]) for number in sorted(set(predicted) & set(forced))]


def _matching_rows(rows: list[dict], path: Path, track: Track) -> list[dict]:
    """The baseline rows of ``track`` when the baseline holds several tracks, else all of them."""
    if any(r.get("references") is not None for r in rows):
        rows = [r for r in rows if r["beta"] == track.beta and r["references"] == track.references]
    if not rows:
        raise DataError(str(path), None, None, f"the baseline has no rows for {track.label}")
    return rows


def evaluate_model(
    settings: ModelEvalConfig, model: Any = None, events: InferenceEvents | None = None
) -> ModelEvaluation:
    """Predict with every track of ``settings.inference`` (one pass), score, write rows and plots, gate the
    primary track.

    ``settings.scoring.out`` defaults to ``inference.out/metrics.parquet`` (for a single track it is that
    track's own file); an ``out`` given that holds the metrics of other data is refused before anything
    runs unless ``scoring.overwrite``, as ``evaluate_predictions`` refuses it. The beta plot is drawn when at least two numeric betas ran with predicted
    references. The baseline is read before anything is written, so it may be the file this run replaces.
    """
    scoring = settings.scoring
    baseline = scoring.baseline
    baseline_rows = read_rows(baseline) if baseline is not None else None
    if scoring.out is not None and not scoring.overwrite:
        check_replaceable(scoring.out, data_sha256(settings.inference.data))
    summary = run_inference(settings.inference, model=model, events=events)
    config = summary.config
    evaluations = score_run(config.data, config.track_folders, config.out, config.root, config.allow_outside_root)
    if not evaluations:
        raise DataError(config.data, None, None, "no predicted dialogue has ground-truth masks: nothing to score")
    tracks = config.tracks
    rows: list[dict] = []
    summaries = {}
    problems: list[DataError] = []
    for track in tracks:
        evaluation = evaluations[track.label]
        summaries[track] = evaluation.summary
        rows.extend(evaluation.rows)
        problems.extend(evaluation.problems)
    out_path = Path(scoring.out) if scoring.out is not None else Path(config.out) / METRICS_FILE
    manifest = run_scored_manifest(config.out)
    write_rows(out_path, rows, manifest)
    primary = primary_track(tracks)
    result = ModelEvaluation(summary, tracks, primary, summaries, rows, out_path, problems,
                             evaluations[primary.label].missing, manifest=manifest)
    primary_rows = evaluations[primary.label].rows
    forced = Track(primary.beta, teacher_forcing=True)
    if not primary.teacher_forcing and forced in tracks:
        result.tf_gap = round_gaps(primary_rows, evaluations[forced.label].rows)
    if scoring.plot is not None:
        round_curve(summarize(primary_rows)["round"], scoring.plot, title=f"Score per round ({primary.label})")
        result.round_plot = Path(scoring.plot)
    swept = [t for t in tracks if t.beta is not None and not t.teacher_forcing]
    if settings.beta_plot is not None and len(swept) >= 2:
        beta_curve({t.beta: aggregate(evaluations[t.label].rows) for t in swept}, settings.beta_plot)
        result.beta_plot = Path(settings.beta_plot)
    matching = _matching_rows(baseline_rows, Path(baseline), primary) if baseline_rows is not None else None
    skipped = summary.skipped + evaluations[primary.label].skipped
    result.gate = run_gate(primary_rows, matching, skipped, scoring.gate, baseline)
    result.baseline_written = write_passed_baseline(scoring.write_baseline, result.gate, rows, manifest)
    return result
