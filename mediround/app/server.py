"""Serve the page of ``mediround app`` on one address, offline.

gradio reads its settings from the environment when it is imported, so ``serve`` sets them first: no
analytics and so no version check (``GRADIO_ANALYTICS_ENABLED=False``), no hub telemetry, and uploads
kept in the app's own temporary folder, removed when the server stops. The page loads nothing from
outside the server (gradio's default theme serves its fonts itself; no server-side rendering, no
share link, no MCP server); tests/app/test_app_browser.py lists what a real browser fetches.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from mediround.errors import MediRoundError

INSTALL_HINT = 'pip install "mediround[app]"'
LOOPBACK = ("127.0.0.1", "localhost", "::1")
OFFLINE_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_OFFLINE": "1"}


class AppExtraMissing(MediRoundError):
    """gradio is not installed: the ``app`` extra is optional."""


def require_gradio() -> None:
    """``AppExtraMissing`` (one line, saying what to install) when gradio cannot be imported."""
    try:
        found = importlib.util.find_spec("gradio") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise AppExtraMissing(f"mediround app needs gradio, which the optional 'app' extra installs: {INSTALL_HINT}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    return host in LOOPBACK or host.startswith("127.")


def app_folder() -> Path:
    """A new private temporary folder for one server's uploads and sessions (``serve`` removes it)."""
    return Path(tempfile.mkdtemp(prefix="mediround-app-"))


def serve(model: Any, folder: Path, host: str, port: int, beta: float | None, jcm_rounds: str | None = None,
          model_name: str | None = None, notice: str | None = None) -> None:
    """Serve the page until interrupted (Ctrl-C or SIGTERM), keeping uploads and sessions in ``folder``
    (``app_folder``), which is removed then."""
    require_gradio()
    os.environ.update(OFFLINE_ENVIRONMENT)
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "uploads")
    from mediround.app.page import CSS, build_page  # gradio, imported once the environment says offline

    if threading.current_thread() is threading.main_thread():
        # A service manager's stop (SIGTERM) ends the server as Ctrl-C does, so the folder is removed too.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        page = build_page(model, folder / "sessions", beta, jcm_rounds, model_name, notice)
        page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=False, show_error=False, ssr_mode=False, mcp_server=False,
            pwa=False, enable_monitoring=False, footer_links=["settings"], allowed_paths=[str(folder)],
            css=CSS, inbrowser=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
