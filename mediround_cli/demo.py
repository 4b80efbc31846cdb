"""``mediround demo``: the shipped tiny model on a fresh synthetic test set, with an HTML report."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from mediround.default_model import default_checkpoint, default_model_notice
from mediround.inference import DEFAULT_BETA
from mediround.reports.tables import group_table, overall_table, round_table
from mediround_cli.common import console, err_console, handle_errors
from mediround_cli.output import parse_beta, prediction_progress


@click.command(epilog="""\b
Examples:
  mediround demo                                        # writes ./mediround-demo/index.html
  mediround demo --out demo-off --dialogues 4 --beta off""")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("mediround-demo"),
              show_default=True, help="Folder to write (an earlier demo there is replaced).")
@click.option("--dialogues", "n_dialogues", type=click.IntRange(min=1), default=12, show_default=True,
              help="Number of synthetic test dialogues to draw.")
@click.option("--seed", type=int, default=2026, show_default=True, help="Seed of the synthetic test dialogues.")
@click.option("--beta", default=f"{DEFAULT_BETA:g}", show_default=True, metavar="BETA|off",
              help="JCM threshold ('off' disables JCM).")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint folder [default: the shipped tiny model].")
@handle_errors
def demo(out: Path, n_dialogues: int, seed: int, beta: str, model_path: Path | None) -> None:
    """Draw synthetic test dialogues, segment them round by round with JCM, and write an HTML report."""
    # The demo runs the model (torch): imported here so that `mediround demo --help` stays fast.
    from mediround.demo import DemoConfig, run_demo

    if model_path is None:
        err_console.print(default_model_notice(default_checkpoint()), soft_wrap=True)
    config = DemoConfig(out=out, n_dialogues=n_dialogues, seed=seed, beta=parse_beta(beta), model=model_path)
    with prediction_progress("demo", label="segmenting") as events:
        result = run_demo(config, events=events)
    summary = result.evaluation.summaries[result.evaluation.primary]
    console.print(overall_table(summary))
    console.print(round_table(summary))
    console.print(group_table(summary, "names_target"))
    table = Table(title="mediround demo", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("dialogues", str(n_dialogues))
    table.add_row("JCM", "off" if config.beta is None else f"beta {config.beta:g}")
    table.add_row("predictions", str(result.predictions))
    table.add_row("overlays", str(result.predictions / "overlays"))
    table.add_row("per-round Parquet", str(result.rounds))
    table.add_row("report", str(result.index))
    console.print(table)
