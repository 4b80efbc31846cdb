"""``mediround doctor``: the pre-flight table; exit 1 when any row is FAIL."""

from __future__ import annotations

import sys
from collections import Counter

import click
from rich.table import Table

from mediround.doctor import DEFAULT_SAMPLE, FAIL, OK, WARN, CheckResult, DoctorConfig, any_failed, run_doctor
from mediround_cli.common import console, err_console, handle_errors

STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red"}


def results_table(results: list[CheckResult]) -> Table:
    table = Table(title="mediround doctor", show_header=True)
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for row in results:
        table.add_row(row.name, f"[{STYLES[row.status]}]{row.status}[/]", row.detail)
    return table


@click.command(epilog="""\b
Examples:
  mediround doctor                                      # the stack and the GPUs only
  mediround doctor mediround-7b-24gb --gpu-memory 24        # will the 24 GB recipe fit one 24 GiB GPU?
  mediround doctor recipes/mediround-7b-4gpu.yaml --gpus 4 --deepspeed recipes/zero2.json --gpu-memory 48""")
@click.argument("recipe_path", metavar="[RECIPE]", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Judge the memory fit for a GPU of this many GiB instead of the visible ones.")
@click.option("--gpus", "processes", type=click.IntRange(min=1), default=None,
              help="Processes (GPUs) the run will use; ZeRO shards over them (default: visible GPUs, at least 1).")
@click.option("--deepspeed", "deepspeed_config", default=None, help="The DeepSpeed JSON the run will use (ZeRO stage).")
@click.option("--sample", type=click.IntRange(min=1), default=DEFAULT_SAMPLE, show_default=True,
              help="Check the files of the first N dialogues and of N more drawn with a fixed seed.")
@handle_errors
def doctor(
    recipe_path: str | None,
    overrides: tuple[str, ...],
    gpu_memory: float | None,
    processes: int | None,
    deepspeed_config: str | None,
    sample: int,
) -> None:
    """Pre-flight check before a long run: stack, GPUs, bf16 and, with RECIPE, weights, data, output, memory."""
    config = DoctorConfig(recipe_path, overrides, sample, gpu_memory, processes, deepspeed_config)
    with err_console.status("checking", spinner="dots") as status:
        results = run_doctor(config, on_check=lambda row: status.update(f"checked {row.name}"))
    console.print(results_table(results))
    counts = Counter(row.status for row in results)
    summary = f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} FAIL"
    if any_failed(results):
        console.print(f"[red]{summary}: this run would fail[/red]")
        sys.exit(1)
    console.print(f"[green]{summary}[/green]")
