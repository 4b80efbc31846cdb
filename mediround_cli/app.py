"""``mediround app``: the multi-round session of ``chat`` in a local web page (the optional ``app`` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from mediround.inference import DEFAULT_BETA
from mediround_cli.common import err_console, handle_errors
from mediround_cli.output import jcm_rounds_option, load_chat_model


@click.command(epilog="""\b
Examples:
  mediround app                                  # the shipped tiny model, http://127.0.0.1:7860
  mediround app --model runs/x/model --port 8000
  mediround app --host 0.0.0.0                   # reachable from other machines: no authentication!""")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint folder (from `mediround train` / `train-jcm`) [default: the shipped tiny model].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but this machine's loopback exposes the page, which has no "
                   "authentication, to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to listen on.")
@click.option("--beta", default=None, metavar="BETA|off",
              help="The page's starting JCM threshold (changeable in the page). "
                   f"[default: {DEFAULT_BETA:g} when the checkpoint has trained JCM weights, else off]")
@jcm_rounds_option
@handle_errors
def app(model_path: Path | None, host: str, port: int, beta: str | None, jcm_rounds: str | None) -> None:
    """Serve a local page to ask questions about an image round by round (docs/app.md).

    Upload a slice (or a NIfTI/DICOM volume and pick a slice), ask, click a round to refer to its mask,
    undo, reset, change JCM, and download the session (the dialogue JSONL that `mediround infer` replays,
    the masks and the overlays). Needs the optional extra: pip install "mediround[app]".
    """
    # gradio and the model stack are imported here, so that `mediround --help` stays fast.
    from mediround.app.server import app_folder, is_loopback, require_gradio, serve
    from mediround.default_model import default_checkpoint, default_model_notice

    require_gradio()
    if not is_loopback(host):
        err_console.print(f"[yellow]warning:[/yellow] --host {host}: the page has no authentication; anyone who "
                          f"can reach {host}:{port} can upload images and run the model", soft_wrap=True)
    model, threshold = load_chat_model(model_path, beta)
    notice = default_model_notice(default_checkpoint()) if model_path is None else None
    folder = app_folder()
    err_console.print(f"serving on http://{host}:{port} (Ctrl-C to stop); uploads and sessions kept in {folder} "
                      "until then", soft_wrap=True)
    serve(model, folder, host, port, threshold, jcm_rounds, None if model_path is None else str(model_path), notice)
