"""The gradio page of ``mediround app``: controls wired to ``AppSession`` (mediround.app.session).

Import it through ``mediround.app.server.serve``, which turns gradio's analytics and version check off
before gradio is imported. Each browser tab gets its own ``AppSession`` (made on its first action, its
folder removed when gradio drops the tab's state); the model is shared, so every handler runs under one
lock. A handler never raises: bad input becomes one line in the page's status (``error_line``), and the
session stays as it was.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from mediround.app.session import JCM_ROUNDS, AppSession, error_line
from mediround.data.build.volumes import WINDOWS
from mediround.errors import MediRoundError
from mediround.inference import DEFAULT_BETA
from mediround.inference.checkpoint_policy import checkpoint_has_trained_jcm

log = logging.getLogger(__name__)

TITLE = "MediRound: multi-round segmentation"
HELP = (
    "Upload a slice (PNG/JPEG, or a NIfTI file or DICOM series with the `volumes` extra) and ask what to "
    "segment. Each answer adds a round to the history strip; **click a round there** (or type `@N`) to make "
    "the next question refer to its mask. Undo forgets the last round, Reset starts over on the same image, "
    "and the download holds the dialogue (replayable with `mediround infer`), the masks and the overlays."
)
CSS = "#status {min-height: 1.5em} #history .caption-label {white-space: normal}"


def build_page(model: Any, folder: str | Path, beta: float | None, jcm_rounds: str | None = None,
               model_name: str | None = None, notice: str | None = None) -> gr.Blocks:
    """The page for ``model``: tabs keep their files under ``folder``; ``beta`` and ``jcm_rounds`` are the
    JCM settings a tab starts with; ``notice`` (the shipped model's) is shown under the title."""
    root = Path(folder)
    lock = threading.Lock()
    trained = checkpoint_has_trained_jcm(model.config)
    start_rounds = jcm_rounds or model.config.heads.jcm_rounds

    def new_session() -> AppSession:
        return AppSession(model, root / uuid.uuid4().hex, beta, start_rounds, model_name)

    def render(session: AppSession | None, status: str) -> tuple:
        """Every output of every handler, from the session as it now is."""
        session = session or new_session()
        views = session.views()
        shape = session.image.shape[:2] if session.image is not None else (1, 1)
        shown = views[-1].overlay if views else session.image
        lines = [view.line(shape) for view in views]
        table = "\n".join(f"- {line}" for line in lines) if lines else "No rounds yet."
        if session.selected is not None:
            reference = f"The next question refers to **round {session.selected}** (click it again to clear)."
        else:
            reference = "The next question refers to no round (click one in the history, or type `@N`)."
        archive = session.archive() if views else None
        volume = session.volume
        slider = gr.update(visible=volume is not None, maximum=max(volume.count - 1, 1) if volume else 1,
                           value=volume.index if volume else 0)
        window = gr.update(visible=volume is not None, value=volume.window if volume else "auto")
        history = [(view.overlay, view.caption) for view in views]
        where = session.source or "no image yet"
        if volume is not None:
            where += f", axial slice {volume.index}"
        label = f"{where}: round {views[-1].round.number}" if views else where
        return (session, gr.update(value=shown, label=label), history, table, status, reference,
                gr.update(value=archive, interactive=archive is not None), slider, window)

    def guarded(action: Callable[..., str | None]) -> Callable[..., tuple]:
        """Run ``action(session, *inputs)`` under the model lock; its return (or the error) is the status."""

        def handler(session: AppSession | None, *inputs: Any) -> tuple:
            session = session or new_session()
            with lock:
                try:
                    status = action(session, *inputs) or ""
                except MediRoundError as error:
                    status = f"error: {error_line(error)}"
                except Exception as error:  # the page shows one line; the log keeps the traceback
                    log.exception("mediround app: unexpected error")
                    status = f"error: {error_line(error)}"
                return render(session, status)

        return handler

    def upload(session: AppSession, files: list[str] | None) -> str:
        session.open_files(files or [])
        where = "" if session.volume is None else (
            f" (axial slice {session.volume.index} of {session.volume.count}, window {session.volume.resolved})")
        return f"{session.source}: ready{where}; ask a question"

    def slice_(session: AppSession, index: float) -> str:
        session.select_slice(int(index))
        return f"axial slice {session.volume.index}: a new image, no rounds yet"

    def window(session: AppSession, value: str) -> str:
        session.set_window(value)
        return f"window {session.volume.resolved}: a new image, no rounds yet"

    def ask(session: AppSession, line: str) -> str:
        answered = session.ask(line)
        views = session.views()
        judged = [f"round {r.number} judged now: {views[r.number - 1].jcm}"
                  for r in session.chat.judged_by(answered.number)]
        encoded = (f" (image encoded once, {1000 * session.chat.encode_seconds:.0f} ms)"
                   if answered.number == 1 else "")
        return "; ".join([*judged, views[-1].line(session.image.shape[:2]) + encoded])

    def select(session: AppSession, index: int) -> str:
        selected = session.select(index + 1)
        return f"round {selected} selected as the next reference" if selected else "reference cleared"

    def clicked(session: AppSession | None, evt: gr.SelectData) -> tuple:
        """A click on the history strip (gradio passes the clicked item's index as ``evt``)."""
        return guarded(select)(session, int(evt.index))

    def undo(session: AppSession) -> str:
        return f"round {session.undo().number} undone"

    def reset(session: AppSession) -> str:
        session.reset()
        return "session reset: same image, no rounds"

    def settings(session: AppSession, on: bool, value: float, rounds: str) -> str:
        session.set_beta(float(value) if on else None)
        session.set_jcm_rounds(rounds)
        jcm = "JCM off" if session.beta is None else f"JCM at beta {session.beta:g} on {session.jcm_rounds} rounds"
        return f"{jcm} from the next round on"

    with gr.Blocks(analytics_enabled=False, title="MediRound") as page:
        state = gr.State(None, delete_callback=lambda session: session.close() if session else None)
        gr.Markdown(f"## {TITLE}\n{HELP}" + (f"\n\n*{notice}*" if notice else ""))
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(label="Image or volume", file_count="multiple", type="filepath", elem_id="upload")
                slice_slider = gr.Slider(0, 1, step=1, value=0, label="Axial slice", visible=False,
                                         elem_id="slice")
                window_box = gr.Dropdown(list(WINDOWS), value="auto", label="Window", allow_custom_value=True,
                                         visible=False, elem_id="window",
                                         info="a named window, percentile, or LEVEL,WIDTH")
                question = gr.Textbox(label="Question", placeholder="Segment the liver.", elem_id="question")
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    undo_button = gr.Button("Undo", elem_id="undo")
                    reset_button = gr.Button("Reset", elem_id="reset")
                reference = gr.Markdown(elem_id="reference")
                with gr.Accordion("JCM (applies to the next rounds)", open=False):
                    jcm_on = gr.Checkbox(value=beta is not None, label="JCM on", interactive=trained,
                                         elem_id="jcm-on")
                    beta_slider = gr.Slider(0.0, 1.0, step=0.01, value=DEFAULT_BETA if beta is None else beta,
                                            label="beta (q <= beta decodes the refined [SEG])", interactive=trained,
                                            elem_id="beta")
                    rounds_radio = gr.Radio(list(JCM_ROUNDS), value=start_rounds, label="jcm-rounds",
                                            elem_id="jcm-rounds")
                    if not trained:
                        gr.Markdown("This checkpoint has no trained JCM weights: JCM stays off.")
                download = gr.DownloadButton("Download session (.zip)", interactive=False, elem_id="download")
            with gr.Column(scale=3):
                view = gr.Image(label="no image yet", type="numpy", interactive=False, height=520, elem_id="view")
                status = gr.Markdown(elem_id="status")
        history = gr.Gallery(label="History (click a round to refer to it)", columns=6, height=260, fit_columns=False,
                             object_fit="contain", format="png",
                             allow_preview=False, elem_id="history")
        table = gr.Markdown(elem_id="rounds")

        outputs = [state, view, history, table, status, reference, download, slice_slider, window_box]
        # The upload box empties once read (the view's label names the file): each upload is a new image,
        # never added to the files of the one before.
        files.upload(guarded(upload), [state, files], outputs).then(lambda: None, None, files)
        # Dragging or arrow keys: the slice of the last position once the one before is shown.
        slice_slider.input(guarded(slice_), [state, slice_slider], outputs, trigger_mode="always_last")
        window_box.input(guarded(window), [state, window_box], outputs)
        for event in (ask_button.click, question.submit):
            event(guarded(ask), [state, question], outputs).then(lambda: "", None, question)
        history.select(clicked, [state], outputs)
        undo_button.click(guarded(undo), [state], outputs)
        reset_button.click(guarded(reset), [state], outputs)
        for control in (jcm_on, beta_slider, rounds_radio):
            control.input(guarded(settings), [state, jcm_on, beta_slider, rounds_radio], outputs)
        page.load(lambda session: render(session, "upload an image to start"), [state], outputs)
    return page
