"""``mediround synth``: write the synthetic multi-round benchmark."""

from __future__ import annotations

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mediround.data.synth import (
    ANSWER_STYLES,
    PHRASINGS,
    SPLITS,
    SynthSummary,
    Wording,
    generate,
    split_sizes,
)
from mediround_cli.common import add_count_rows, console, count_table, err_console, handle_errors


def summary_table(summary: SynthSummary) -> Table:
    table = count_table(f"synthetic benchmark in {summary.out_dir}")
    for split, count in summary.dialogues.items():
        table.add_row(f"dialogues: {split}", str(count))
    table.add_row("rounds", str(summary.rounds))
    table.add_row("reference-only rounds", str(summary.reference_only_rounds))
    table.add_row(
        "  of which the text alone resolves", str(summary.text_resolvable_reference_only_rounds)
    )
    add_count_rows(
        table,
        (("scenario", summary.scenarios), ("modality", summary.modalities), ("difficulty", summary.difficulties)),
    )
    table.add_row("median mask area", f"{100 * summary.median_mask_fraction:.1f}% of the image")
    return table


@click.command(epilog="""\b
Examples:
  mediround synth data/synth                            # 400 dialogues: train/val/test .jsonl
  mediround synth data/synth-a --phrasings a             # train on one half of the wordings
  mediround synth data/synth-b --phrasings b --split test  # evaluate on the other half""")
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--dialogues",
    "n_dialogues",
    type=click.IntRange(min=1),
    default=400,
    show_default=True,
    help="Number of dialogues (split 80/10/10 with --split all).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files, byte for byte.")
@click.option(
    "--split",
    type=click.Choice([*SPLITS, "all"]),
    default="all",
    show_default=True,
    help="Which split file to write.",
)
@click.option(
    "--size",
    "image_size",
    type=click.IntRange(min=32),
    default=128,
    show_default=True,
    help="Image side in pixels.",
)
@click.option(
    "--answers",
    type=click.Choice(ANSWER_STYLES),
    default="mr-medseg",
    show_default=True,
    help="mr-medseg: answers never name the target and reference-only rounds cannot be resolved from the "
    "text; named: the first benchmark's style.",
)
@click.option(
    "--phrasings",
    type=click.Choice(PHRASINGS),
    default="all",
    show_default=True,
    help="All template wordings, or one half (a/b) of each: same scenes and rounds, other words.",
)
@handle_errors
def synth(out: str, n_dialogues: int, seed: int, split: str, image_size: int, answers: str, phrasings: str) -> None:
    """Generate N synthetic dialogues with images and masks under OUT (OUT/<split>.jsonl, images/, masks/)."""
    sizes = split_sizes(n_dialogues) if split == "all" else {split: n_dialogues}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        tasks = {name: progress.add_task(f"synth {name}", total=count) for name, count in sizes.items()}
        summary = generate(
            out,
            n_dialogues,
            seed,
            split=split,
            image_size=image_size,
            progress=lambda name, done: progress.update(tasks[name], completed=done),
            wording=Wording(answers, phrasings),
        )
    console.print(summary_table(summary))
    for name, path in summary.files.items():
        console.print(f"{name}: {path}")
