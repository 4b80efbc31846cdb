"""``mediround convert-llava``: original-layout LLaVA / LLaVA-Med folder -> HF LlavaForConditionalGeneration folder."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mediround_cli.common import console, err_console, handle_errors

SIZE_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    text = value.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return int(float(number) * SIZE_UNITS[unit])
            except ValueError:
                break
    raise click.BadParameter(f"'{value}' is not a size like 5GB or 500MB", ctx=ctx, param=param)


def _human_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@click.command("convert-llava", epilog="""\b
Examples:
  mediround convert-llava weights/llava-med-v1.5-mistral-7b weights/llava-med-v1.5-mistral-7b-hf --dtype bfloat16
  mediround convert-llava weights/llava-med-v1.5-mistral-7b out-hf --vision-tower weights/clip-vit-large-patch14-336 --overwrite""")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--vision-tower",
    "vision_tower",
    type=str,
    default=None,
    help="Local folder of the CLIP vision tower (default: config.json mm_vision_tower, if it is a local folder).",
)
@click.option(
    "--allow-partial-load", is_flag=True, help="Write the folder even if tensors are missing or unexpected."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Cast floating tensors (default: keep the stored dtype).",
)
@click.option(
    "--max-shard-size",
    "max_shard_bytes",
    default="5GB",
    callback=_parse_size,
    show_default=True,
    help="Largest safetensors shard to write.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@handle_errors
def convert_llava(
    source: Path,
    output: Path,
    vision_tower: str | None,
    allow_partial_load: bool,
    dtype: str | None,
    max_shard_bytes: int,
    overwrite: bool,
) -> None:
    """Convert SOURCE (LlavaMistralForCausalLM layout, e.g. llava-med-v1.5-mistral-7b) into an HF LLaVA folder OUTPUT."""
    from mediround.convert import ConvertLlavaConfig
    from mediround.convert import convert_llava as run_conversion

    config = ConvertLlavaConfig(
        source=source,
        output=output,
        vision_tower=vision_tower,
        allow_partial_load=allow_partial_load,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
    columns = (TextColumn("converting tensors"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("convert", total=None)
        report = run_conversion(
            config, progress=lambda done, total: progress.update(task, completed=done, total=total)
        )

    table = Table(title=f"convert-llava -> {report.output}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("tensors in SRC", str(report.source_tensors))
    table.add_row("tensors written (with the tower)", str(report.tensors_written))
    table.add_row("size written", _human_size(report.bytes_written))
    table.add_row("shards", str(len(report.shard_files)))
    table.add_row(
        "<image> token id", f"{report.image_token_index}" + (" (added)" if report.image_token_added else "")
    )
    table.add_row("vocab", f"{report.source_vocab_size} -> {report.vocab_size}")
    table.add_row("image tokens per image", str(report.image_seq_length))
    table.add_row("vision weights from", report.vision_weights_from)
    table.add_row("dropped (derived buffers, CLIP text half)", str(len(report.dropped)))
    table.add_row("missing", str(len(report.missing)))
    table.add_row("unexpected", str(len(report.unexpected)))
    console.print(table)
    if report.missing or report.unexpected:
        err_console.print(
            f"[yellow]partial load written (--allow-partial-load): {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected; see conversion_report.json[/yellow]"
        )
