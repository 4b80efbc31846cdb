"""``mediround build-dialogues``: multi-round referring dialogues from labelled segmentation data."""

from __future__ import annotations

import re

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mediround.data.build import KINDS, BuildOptions, BuildSummary, SliceOptions, SliceRule, build, merge
from mediround.data.build.dialogues import SIDE_MODES
from mediround.data.build.shards import DEFAULT_SPLIT
from mediround.data.build.volumes import AXES
from mediround_cli.common import (
    add_count_rows,
    console,
    count_table,
    err_console,
    exit_skipped,
    handle_errors,
)
from mediround_cli.volume_options import slices_option, window_option


def summary_table(summary: BuildSummary) -> Table:
    table = count_table(f"dialogues in {summary.out_dir}")
    for split in summary.files:
        table.add_row(f"{split}: cases / dialogues", f"{summary.cases[split]} / {summary.dialogues[split]}")
    if summary.images:
        table.add_row("images read / without a dialogue", f"{summary.images} / {summary.skipped_images}")
    if summary.errors:
        table.add_row("unreadable cases/images skipped", str(len(summary.errors)), style="yellow")
    table.add_row("rounds", str(summary.rounds))
    add_count_rows(table, (
        ("rounds by scenario", summary.round_scenarios),
        ("rounds by reference use", summary.reference_use),
        ("rounds by modality", summary.modalities),
    ))
    if summary.images:
        table.add_row("images/s", f"{summary.images_per_second:.1f}")
    return table


def parse_range(text: str, option: str) -> tuple[int, int]:
    """``2..6`` -> (2, 6); ``3/8`` -> (3, 8)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:\.\.|/)\s*(\d+)\s*", text)
    if match is None:
        raise click.BadParameter(f"expected two numbers like 2..6 or 1/4, got {text!r}", param_hint=option)
    return int(match.group(1)), int(match.group(2))


def parse_split(text: str) -> tuple[int, int, int]:
    """``80/10/10`` -> (80, 10, 10): train/val/test percentages of the cases, summing to 100."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or sum(int(group) for group in match.groups()) != 100:
        raise click.BadParameter(f"expected train/val/test percentages summing to 100 like 80/10/10, got {text!r}",
                                 param_hint="--split")
    return tuple(int(group) for group in match.groups())


@click.command(name="build-dialogues", epilog="""\b
Examples:
  mediround build-dialogues data/sam-med2d-demo built/                 # kind detected from the layout
  mediround build-dialogues Dataset003_Liver built/ --slices 40:80 --step 4 --window -600,1500 --workers 4
  mediround build-dialogues --merge built-1/ built-2/ built/           # join --shard outputs""")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--from", "kind", type=click.Choice(KINDS), help="Source kind (default: detected from the layout).")
@click.option("--merge", "merging", is_flag=True, help="Join shard outputs: PATHS are OUT_1 ... OUT_N OUT.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same dialogues, for any --workers/--shard.")
@click.option("--rounds", default="2..6", show_default=True, help="Rounds per dialogue, MIN..MAX.")
@click.option("--format", "output_format", type=click.Choice(["jsonl", "mrmedseg"]), default="jsonl", show_default=True,
              help="Split files as JSONL or MR-MedSeg JSON.")
@click.option("--sides", type=click.Choice(SIDE_MODES), default="radiological", show_default=True,
              help="radiological: CT/MRI side words are the patient's (left = image right); image: as seen.")
@click.option("--axis", type=click.Choice(list(AXES)), default="axial", show_default=True, help="Volumes: slice axis.")
@slices_option("Volumes: every --step-th slice with --min-labels labels, each label's largest slice, or every "
               "--step-th slice with --min-labels labels among slices A to B-1 along --axis (0-based).")
@click.option("--step", type=click.IntRange(min=1), default=1, show_default=True, help="Volumes: keep every k-th slice.")
@click.option("--min-labels", type=click.IntRange(min=1), default=2, show_default=True,
              help="Volumes: labels a kept slice must show.")
@click.option("--label", help="Volumes, with --slices largest: only this label's largest slice.")
@window_option
@click.option("--split", "split", default="/".join(map(str, DEFAULT_SPLIT)), show_default=True,
              help="train/val/test percentages of the cases (a case's split depends only on its id and these).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--shard", default="1/1", show_default=True, help="Build only shard i of N (cases split deterministically).")
@handle_errors
def build_dialogues(paths: tuple[str, ...], kind: str | None, merging: bool, seed: int, rounds: str,
                    output_format: str, sides: str, axis: str, slices: tuple, step: int, min_labels: int,
                    label: str | None, window: str, split: str, workers: int, shard: str) -> None:
    """Build multi-round dialogues from labelled data: SRC OUT, or --merge OUT_1 ... OUT_N OUT."""
    if merging:
        if len(paths) < 2:
            raise click.UsageError("--merge needs at least one shard output and the merged OUT")
        summary = merge(list(paths[:-1]), paths[-1])
    else:
        if len(paths) != 2:
            raise click.UsageError("give SRC and OUT (or --merge OUT_1 ... OUT_N OUT)")
        min_rounds, max_rounds = parse_range(rounds, "--rounds")
        if not 1 <= min_rounds <= max_rounds:
            raise click.BadParameter(f"need 1 <= MIN <= MAX, got {rounds}", param_hint="--rounds")
        options = BuildOptions(
            seed=seed, min_rounds=min_rounds, max_rounds=max_rounds, sides=sides, format=output_format,
            slices=SliceOptions(axis, SliceRule(slices[0], step, min_labels, label, slices[1]), window),
            split=parse_split(split),
        )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err_console, transient=True) as progress:
            task = progress.add_task("cases", total=None)
            summary = build(
                paths[0], paths[1], kind, options, workers, parse_range(shard, "--shard"),
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    console.print(summary_table(summary))
    for name, path in summary.files.items():
        console.print(f"{name}: {path}")
    exit_skipped(len(summary.errors), "unreadable case(s) or image(s)", str(summary.errors_file))
