"""What the benchmark scripts share: the synthetic benchmark's size and seed, the history-blind variant
(every round a dialogue of its own, without its reference), and the page helpers (charts, Markdown tables).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mediround.data.dialogue import Dialogue
from mediround.data.formats import load_dialogues
from mediround.data.formats.jsonl import write_jsonl
from mediround.data.synth import Wording, generate, split_sizes
from mediround.reports.plots import WIDTH, Curve, line_chart

SYNTH_DIALOGUES, SYNTH_SEED = 500, 0
SYNTH_PHRASINGS, HELDOUT_PHRASINGS = "a", "b"
"""Training, validation and the in-style test use one half of every template list; the held-out test
words the same test dialogues with the other half (``mediround synth --phrasings``)."""
SYNTH_COMMAND = f"mediround synth data/synth --dialogues {SYNTH_DIALOGUES} --seed {SYNTH_SEED} --phrasings {SYNTH_PHRASINGS}"
HELDOUT_COMMAND = (f"mediround synth data/synth-heldout --dialogues {split_sizes(SYNTH_DIALOGUES)['test']} "
                   f"--split test --seed {SYNTH_SEED} --phrasings {HELDOUT_PHRASINGS}")
BLIND_SUFFIX = "-r"
BLIND_BATCH = 34
"""Single-round dialogues per history-blind step: the recipe's 8 dialogues x 4.2 rounds on average."""
BLIND_DATA_OVERRIDES = ("data.train=data/synth/train-blind.jsonl", "data.val=data/synth/val-blind.jsonl",
                        f"train.batch_size={BLIND_BATCH}")
SERIES_COLOURS = [(120, 120, 120), (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
EXTRA_WIDTH = 125
"""Added to the chart width so that the legend of long method names sits beside the curves."""


def history_blind(dialogue: Dialogue) -> list[Dialogue]:
    """Each round as a dialogue of its own (id ``<id>-r<k>``) without its reference: no history can be used."""
    return [replace(dialogue, id=f"{dialogue.id}{BLIND_SUFFIX}{number}", rounds=[replace(round_, ref=None)])
            for number, round_ in enumerate(dialogue.rounds, start=1)]


def write_blind(source: Path, target: Path) -> Path:
    """The history-blind copy of a JSONL file, beside it (image and mask paths stay valid)."""
    loaded = load_dialogues(source)
    if loaded.problems:
        raise SystemExit(f"{source}: {loaded.problems[0].one_line()}")
    write_jsonl([blind for dialogue in loaded.dialogues for blind in history_blind(dialogue)], target)
    return target


def prepare_benchmark(work: Path) -> Path:
    """WORK/data/synth (``SYNTH_COMMAND``), WORK/data/synth-heldout (``HELDOUT_COMMAND``) and the history-blind
    copy of every split, each written unless already there; returns WORK/data."""
    data = work / "data"
    if not (data / "synth" / "train.jsonl").is_file():
        generate(data / "synth", SYNTH_DIALOGUES, SYNTH_SEED, wording=Wording(phrasings=SYNTH_PHRASINGS))
    if not (data / "synth-heldout" / "test.jsonl").is_file():
        generate(data / "synth-heldout", split_sizes(SYNTH_DIALOGUES)["test"], SYNTH_SEED, split="test",
                 wording=Wording(phrasings=HELDOUT_PHRASINGS))
    for split in ("synth/train", "synth/val", "synth/test", "synth-heldout/test"):
        if not (data / f"{split}-blind.jsonl").is_file():
            write_blind(data / f"{split}.jsonl", data / f"{split}-blind.jsonl")
    return data


def score_lines(series: Mapping[str, Mapping[float, float]], path: Path, title: str, x_label: str,
                x_format: Callable[[float], str] = lambda x: f"{x:g}") -> None:
    """Several named curves of x100 scores against x, y axis fitted to the data, legend beside the curves."""
    values = [y for points in series.values() for y in points.values()]
    low, high = max(0, 10 * math.floor(min(values) / 10 - 0.5)), min(100, 10 * math.ceil(max(values) / 10 + 0.5))
    xs = sorted({x for points in series.values() for x in points})
    curves = [Curve(label, SERIES_COLOURS[index % len(SERIES_COLOURS)], [(x - xs[0], points[x]) for x in sorted(points)])
              for index, (label, points) in enumerate(series.items())]
    line_chart(path, curves, x_extent=xs[-1] - xs[0], x_ticks=[(x - xs[0], x_format(x)) for x in xs],
               x_label=x_label, y_label="score (x100)", title=title, y_range=(low, high), y_step=10,
               width=WIDTH + EXTRA_WIDTH, legend_beside=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
