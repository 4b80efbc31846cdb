"""``mediround export CKPT OUT [--merge/--no-merge]``: a standalone checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import click

from mediround_cli.common import console, handle_errors


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merge/--no-merge", default=True, show_default=True, help="Merge LoRA into the LLaVA weights.")
@handle_errors
def export(checkpoint: Path, out: Path, merge: bool) -> None:
    """Export CHECKPOINT to OUT with the base weights inside (LoRA merged with --merge)."""
    from mediround.model.checkpoint import export_checkpoint

    folder = export_checkpoint(checkpoint, out, merge=merge)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    console.print(f"exported {checkpoint} -> {folder} ({size / 2**20:.1f} MiB, LoRA {'merged' if merge else 'kept'})")
