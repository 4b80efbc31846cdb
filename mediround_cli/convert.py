"""``mediround convert``: MR-MedSeg JSON <-> JSONL, SA-Med2D folder -> dialogues."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from mediround.data.build.shards import BuildOptions, build_file
from mediround.data.formats import detect
from mediround.data.formats.convert import convert as convert_data
from mediround.data.formats.convert import target_format_for
from mediround.errors import DataError
from mediround_cli.build_dialogues import summary_table
from mediround_cli.common import console, exit_skipped, handle_errors


@click.command(epilog="""\b
Examples:
  mediround convert mr-medseg/train.json train.jsonl
  mediround convert data/sam-med2d out/dialogues.jsonl --from sa-med2d
  mediround convert train.jsonl train.json --overwrite""")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--from",
    "source_format",
    type=click.Choice(["auto", "jsonl", "mrmedseg", "sa-med2d"]),
    default="auto",
    show_default=True,
    help="Input format (auto: detected from the content).",
)
@click.option(
    "--to",
    "target_format",
    type=click.Choice(["jsonl", "mrmedseg"]),
    default=None,
    help="Output format (default: .jsonl -> jsonl, .json -> mrmedseg).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=str),
    help="Folder the input's paths are relative to (default: its folder).",
)
@click.option("--allow-outside-root", is_flag=True, help="Accept absolute paths and paths leaving the root.")
@click.option("--single-round", is_flag=True,
              help="SA-Med2D: one single-round dialogue per mask (default: multi-round, as build-dialogues).")
@click.option("--seed", type=int, default=0, show_default=True, help="SA-Med2D multi-round: dialogue seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT when it exists (even when it is SOURCE).")
@handle_errors
def convert(
    source: str,
    output: str,
    source_format: str,
    target_format: str | None,
    root: str | None,
    allow_outside_root: bool,
    single_round: bool,
    seed: int,
    overwrite: bool,
) -> None:
    """Convert SOURCE to OUTPUT, paths rewritten relative to OUTPUT's folder; bad dialogues are skipped.

    An SA-Med2D folder becomes multi-round dialogues (images and masks written beside OUTPUT). An existing
    OUTPUT is refused without --overwrite. Exits 3 when anything was skipped."""
    if Path(output).exists() and not overwrite:
        same = Path(source).exists() and Path(output).resolve() == Path(source).resolve()
        raise DataError(output, None, None, ("is SOURCE itself" if same else "exists")
                        + ": pass --overwrite to replace it, or choose another OUTPUT")
    if not single_round and (source_format == "sa-med2d" or (source_format == "auto" and detect(source) == "sa-med2d")):
        summary = build_file(source, output, "sa-med2d", target_format or target_format_for(output), BuildOptions(seed=seed))
        for record in summary.errors:
            console.print(DataError(**record).one_line(), soft_wrap=True, markup=False)
        console.print(summary_table(summary))
        exit_skipped(len(summary.errors), "unreadable image(s)", "the lines above")
        return
    result = convert_data(source, output, source_format, target_format, root, allow_outside_root)
    for problem in result.problems:
        console.print(problem.one_line(), soft_wrap=True, markup=False)
    table = Table(
        title=f"{Path(source).name} ({result.source_format}) -> {Path(output).name} ({result.target_format})"
    )
    table.add_column("read", justify="right")
    table.add_column("written", justify="right")
    table.add_column("skipped", justify="right")
    skipped = result.total - result.written
    table.add_row(str(result.total), str(result.written), str(skipped), style="red" if skipped else None)
    console.print(table)
    if result.outside_output_folder:
        console.print(
            f"[yellow]{result.outside_output_folder} dialogue(s) name files outside {output}'s folder: "
            "validate with --allow-outside-root, or write the output inside the data folder[/yellow]"
        )
    if result.problems:
        exit_skipped(skipped, f"item(s), {len(result.problems)} problem(s),", "the lines above")
