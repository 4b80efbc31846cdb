"""A self-contained HTML page of a scored predictions folder: summary tables, then each dialogue's rounds.

A colour legend opens the page. Each dialogue shows its overlay picture (``mediround.reports.overlays``:
predicted mask orange, ground truth green, each tile captioned with its round's Dice) and one table row per round: the query, the round it refers to, whether it names its target,
the model's answer, the JCM score and whether the refined [SEG] was used, and the round's Dice and IoU.
Images are linked by paths relative to the page, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mediround.atomic import atomic_open
from mediround.data.dialogue import Dialogue
from mediround.data.predictions import read_predictions, safe_name
from mediround.metrics import METRIC_LABELS, METRICS, Scores, summarize
from mediround.reports.overlays import ALPHA, OVERLAYS_FOLDER, PREDICTED_COLOUR, TRUTH_COLOUR
from mediround.reports.tables import NAMES_TARGET_LABELS

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section { border-top: 2px solid #ddd; padding-top: 0.5em; margin-top: 1.5em; }
img { max-width: 100%; }
.note { color: #555; }
.ref-only { background: #fff6e0; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 0.3em 0 1em; }
"""
REPORT_FILE = "report.html"


def _cell(value: Any, numeric: bool = False) -> str:
    css = ' class="num"' if numeric else ""
    return f"<td{css}>{html.escape(str(value))}</td>"


def _label(grouping: str, value: Any) -> str:
    if grouping == "names_target":
        return NAMES_TARGET_LABELS[value]
    return "all" if grouping == "overall" else ("unknown" if value is None else str(value))


def _order(value: Any) -> tuple:
    """Known values first: True before False, rounds by number, ``regular`` before ``hard``."""
    rank = {True: 0, False: 1, "regular": 0, "hard": 1}.get(value, 2) if isinstance(value, (bool, str)) else 2
    return (value is None, rank, value if isinstance(value, int) and not isinstance(value, bool) else 0, str(value))


def _css_colour(colour: Any) -> str:
    return "rgb({}, {}, {})".format(*(int(c) for c in colour))


def _legend() -> str:
    """The overlay colours, as the tiles mix them over a mid-grey pixel."""
    grey = 128.0
    both = (1 - ALPHA) * ((1 - ALPHA) * grey + ALPHA * TRUTH_COLOUR) + ALPHA * PREDICTED_COLOUR
    entries = (("predicted mask", (1 - ALPHA) * grey + ALPHA * PREDICTED_COLOUR),
               ("ground truth", (1 - ALPHA) * grey + ALPHA * TRUTH_COLOUR), ("both", both))
    swatches = "".join(f"<span class='swatch' style='background: {_css_colour(colour)}'></span>{name}"
                       for name, colour in entries)
    return (f"<p class='legend'>Overlay colours:{swatches}. Each round's tile is captioned with its Dice "
            "(x100) when the data has ground truth.</p>")


def _scores_table(groups: Mapping[Any, Scores], grouping: str) -> str:
    header = (grouping, "masks", *(METRIC_LABELS[metric] for metric in METRICS))
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in header) + "</tr>"]
    for value, scores in sorted(groups.items(), key=lambda item: _order(item[0])):
        lines.append("<tr>" + _cell(_label(grouping, value)) + _cell(scores.count, True)
                     + "".join(_cell(f"{scores.points(m):.1f}", True) for m in METRICS) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _round_rows(dialogue: Dialogue, rows: Mapping[int, Mapping[str, Any]],
                predictions: Mapping[int, Mapping[str, Any]]) -> str:
    header = ("round", "refers to", "query", "names target", "answer", "JCM score", "refined", "Dice", "IoU")
    lines = ["<table><tr>" + "".join(f"<th>{name}</th>" for name in header) + "</tr>"]
    for number, round_ in enumerate(dialogue.rounds, start=1):
        row = rows.get(number, {})
        record = predictions.get(number, {})
        score = record.get("jcm_score")
        css = ' class="ref-only"' if round_.names_target is False else ""
        dice = "" if row.get("dice") is None else f"{100 * row['dice']:.1f}"
        iou = "" if row.get("iou") is None else f"{100 * row['iou']:.1f}"
        lines.append(
            f"<tr{css}>" + _cell(number, True) + _cell("" if round_.ref is None else round_.ref, True)
            + _cell(round_.query) + _cell({True: "yes", False: "no", None: ""}[round_.names_target])
            + _cell(record.get("answer", "")) + _cell("" if score is None else f"{score:.2f}", True)
            + _cell({True: "yes", False: "no"}.get(record.get("refined"), "")) + _cell(dice, True)
            + _cell(iou, True) + "</tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


def render_report(
    title: str,
    dialogues: Sequence[Dialogue],
    rows: Sequence[Mapping[str, Any]],
    predictions: Mapping[tuple[str, int], Mapping[str, Any]],
    overlays: Mapping[str, str],
    notes: Sequence[str] = (),
    figures: Sequence[tuple[str, str]] = (),
) -> str:
    """The page as a string. ``rows`` are metric rows (``mediround.reports.rows``), ``predictions`` the
    records of ``predictions.jsonl`` keyed by (id, round), ``overlays`` maps dialogue ids to image paths
    relative to the page, ``figures`` are (caption, relative path) pairs shown after the tables."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    parts.append(_legend())
    if rows:
        summary = summarize(rows)
        parts.append("<h2>Scores (x100)</h2>")
        for grouping in ("overall", "names_target", "difficulty", "round"):
            if any(value is not None for value in summary[grouping]) or grouping == "overall":
                parts.append(_scores_table(summary[grouping], grouping))
        parts.append("<p class='note'>names target: the round's query or answer names the entity; "
                     "'no' rounds (shaded below) can only be resolved through the round they refer to.</p>")
    for caption, path in figures:
        parts.append(f"<figure><img src='{html.escape(path)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    by_dialogue: dict[str, dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        by_dialogue.setdefault(row["dialogue_id"], {})[int(row["round"])] = row
    parts.append("<h2>Dialogues</h2>")
    for dialogue in dialogues:
        records = {number: record for (key, number), record in predictions.items() if key == dialogue.id}
        parts.append(f"<section id='{html.escape(dialogue.id)}'><h3>{html.escape(dialogue.id)}</h3>")
        facts = [f"{name}: {value}" for name, value in (("modality", dialogue.modality),
                 ("scenario", dialogue.scenario), ("difficulty", dialogue.difficulty)) if value]
        if facts:
            parts.append(f"<p class='note'>{html.escape(', '.join(facts))}</p>")
        if dialogue.id in overlays:
            parts.append(f"<img src='{html.escape(overlays[dialogue.id])}' alt='overlay of {html.escape(dialogue.id)}'>")
        parts.append(_round_rows(dialogue, by_dialogue.get(dialogue.id, {}), records) + "</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | os.PathLike, page: str) -> Path:
    """Write a page from ``render_report`` atomically."""
    with atomic_open(path) as handle:
        handle.write(page)
    return Path(path)


def write_predictions_report(
    page_path: str | os.PathLike,
    predictions_dir: str | os.PathLike,
    dialogues: Sequence[Dialogue],
    rows: Sequence[Mapping[str, Any]],
    title: str,
    notes: Sequence[str] = (),
    figures: Sequence[tuple[str, str]] = (),
) -> Path:
    """The page of one predictions folder (its records and ``overlays/`` PNGs, linked relative to the
    page), written atomically to ``page_path``; what ``demo``, ``infer --report`` and ``eval --report`` write."""
    page_path, predictions_dir = Path(page_path), Path(predictions_dir)
    overlays = {}
    for dialogue in dialogues:
        overlay = predictions_dir / OVERLAYS_FOLDER / f"{safe_name(dialogue.id)}.png"
        if overlay.is_file():
            overlays[dialogue.id] = Path(os.path.relpath(overlay, page_path.parent)).as_posix()
    page = render_report(title, dialogues, rows, read_predictions(predictions_dir), overlays, notes, figures)
    return write_report(page_path, page)
