"""``mediround export CKPT OUT [--merge/--no-merge]``: a standalone checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import click

from mediround_cli.common import console, handle_errors
from mediround_cli.partial_load import allow_partial_load_option, print_load_reports


@click.command(epilog="""\b
Examples:
  mediround export runs/x/model exported/                # LoRA merged into the LLaVA weights
  mediround export runs/x/model exported-adapter/ --no-merge""")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merge/--no-merge", default=True, show_default=True, help="Merge LoRA into the LLaVA weights.")
@allow_partial_load_option
@handle_errors
def export(checkpoint: Path, out: Path, merge: bool, allow_partial_load: bool) -> None:
    """Export CHECKPOINT to OUT with the base weights inside (LoRA merged with --merge)."""
    from mediround.model.checkpoint import export_checkpoint

    folder = export_checkpoint(checkpoint, out, merge=merge, allow_partial=allow_partial_load,
                               on_load=print_load_reports if allow_partial_load else None)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    console.print(f"exported {checkpoint} -> {folder} ({size / 2**20:.1f} MiB, LoRA {'merged' if merge else 'kept'})")
