"""``mediround chat VOLUME``: one multi-round dialogue on every selected axial slice of a scan.

Each slice is one dialogue of the same questions (a question referring to round N refers to round N's
predicted mask on that slice), run by ``chain_batched`` exactly as ``infer`` runs a data file: slices
advance ``batch_size`` at a time round by round sharing each forward pass, JCM judges at ``beta`` the
rounds ``jcm_rounds`` names, a round without an answer is written by the model. A slice's dialogue is
the one ``infer`` would run on a JSONL line with that slice's ``build-dialogues`` image and these
questions (the same id, ``<case>_axial_<k>``), so both give the same masks. The scan's reading,
windowing and outputs are ``mediround.data.scans``'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mediround.data.dialogue import Dialogue, Round
from mediround.data.scans import Scan, ScanOptions, ScanResult, Segmenter, run_scan
from mediround.inference import DEFAULT_BATCH_SIZE
from mediround.inference.chain import Track, chain_batched
from mediround.model import MediRound

SLICE_KEY = "axial_slice"
"""Where a slice's dialogue keeps its slice index (``Dialogue.extra``)."""


def slice_dialogue(case: str, index: int, questions: Sequence[Round]) -> Dialogue:
    """The dialogue of axial slice ``index``: the questions without answers, id and image named as
    ``build-dialogues`` names that slice."""
    name = f"{case}_axial_{index:04d}"
    rounds = [Round(query=question.query, ref=question.ref) for question in questions]
    return Dialogue(id=name, image=f"images/{name}.png", rounds=rounds, extra={SLICE_KEY: index})


def slice_segmenter(model: MediRound, case: str, questions: Sequence[Round], beta: float | None,
                    jcm_rounds: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Segmenter:
    """A ``Segmenter`` running ``questions`` on each slice with ``model`` (see the module docstring)."""
    track = Track(beta)

    def segment(indices: Sequence[int], image_of: Callable[[int], np.ndarray]) -> Iterator[tuple[int, list[np.ndarray]]]:
        dialogues = (slice_dialogue(case, index, questions) for index in indices)
        for outcome in chain_batched(model, dialogues, lambda d: (image_of(d.extra[SLICE_KEY]), None), [track],
                                     batch_size=batch_size, jcm_rounds=jcm_rounds, file=case):
            if outcome.error is not None:
                raise outcome.error
            yield outcome.dialogue.extra[SLICE_KEY], [prediction.mask for prediction in outcome.results[track]]

    return segment


def chat_volume(model: MediRound, scan: Scan, questions: Sequence[Round], out: str | Path, options: ScanOptions, *,
                beta: float | None, jcm_rounds: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Run ``questions`` on ``scan`` (``mediround.data.scans.read_scan``) and write its label volume (or
    DICOM-SEG) and sidecar into ``out``; ``progress(done, total)`` hears of each finished slice."""
    segmenter = slice_segmenter(model, scan.case, questions, beta, jcm_rounds, batch_size)
    return run_scan(scan, questions, segmenter, out, options, progress=progress)
