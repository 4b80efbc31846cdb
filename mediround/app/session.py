"""One browser tab of ``mediround app``, without the page: what its controls do (no gradio here).

An ``AppSession`` holds the uploaded image (a PNG/JPEG, or one axial slice of a NIfTI file or a DICOM
series, read and windowed as ``chat VOLUME`` and ``build-dialogues`` read them: ``mediround.data.scans``),
and a ``ChatSession`` on it: the object ``mediround chat`` drives, so a question in the page computes
what the same line in ``chat`` computes (tests/app/test_app_session.py). The image is encoded when the
first question about it is asked, once; a new upload, slice or window is a new image and starts over.

A question refers to an earlier round with ``@N`` in its text, as in ``chat``, or to the round clicked in
the history strip (``select``); ``@N`` wins when both are given. The JCM threshold and ``jcm_rounds``
apply to the rounds asked after they change; ``session.json`` records what each round was asked with.

Everything a tab writes lies in its own folder; ``session/`` there is what the download zip holds:

    session.jsonl                the dialogue, as ``chat --save`` writes it (``mediround infer`` replays it)
    <image>.png                  the image (a volume's slice as the model saw it)
    rounds/round-N.png           chat's round files: the mask (0/255) and the overlay of rounds 1..N
    rounds/round-N-overlay.png
    session.json                 the source, the model, each round's JCM settings and the replay command

Bad input raises a ``MediRoundError`` (``DataError``, ``QuestionError``, ``CheckpointError``,
``PageError``) whose text is one line; the session is left as it was before the call.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mediround.atomic import atomic_path, write_json
from mediround.data.build.sources import NIFTI_ENDINGS
from mediround.data.images import load_image, save_image
from mediround.data.scans import Scan, read_scan, scan_window, slice_image, volumes_extra_ready
from mediround.errors import DataError, MediRoundError
from mediround.inference.chat import ChatRound, ChatSession, QuestionError, parse_question
from mediround.inference.checkpoint_policy import checked_betas
from mediround.reports.overlays import mask_overlay

IMAGE_ENDINGS = (".png", ".jpg", ".jpeg")
DICOM_ENDING = ".dcm"
JCM_ROUNDS = ("referred", "all")
SESSION_FOLDER = "session"
DIALOGUE_FILE = "session.jsonl"
SETTINGS_FILE = "session.json"
ROUNDS_FOLDER = "rounds"
UPLOADS_FOLDER = "uploads"


class PageError(MediRoundError):
    """Input the page cannot use: no image yet, a file of no kind it reads, an unknown setting."""


def safe_name(name: str) -> str:
    """A file name of letters, digits, '.', '_' and '-' (the others become '_'), at most 64 characters."""
    stem, dot, ending = name.rpartition(".")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem if dot else ending)[:56] or "image"
    return f"{stem}.{ending.lower()}" if dot else stem


@dataclass
class Volume:
    """The uploaded scan, the ``--window`` value asked for and what it resolved to, its (low, width), and
    the axial slice shown."""

    scan: Scan
    window: str
    resolved: str
    bounds: tuple[float, float]
    index: int

    @property
    def count(self) -> int:
        """Axial slices."""
        return int(self.scan.intensities.shape[2])


@dataclass(frozen=True)
class RoundView:
    """One round as the page shows it: the chat round and its mask tinted over the image."""

    round: ChatRound
    overlay: np.ndarray
    beta: float | None

    @property
    def jcm(self) -> str:
        """What JCM said: "JCM off", "JCM: not judged yet" or "JCM 0.41 <= 0.6: refined"."""
        if self.beta is None and self.round.jcm_score is None:
            return "JCM off"
        if self.round.jcm_score is None:
            return "JCM: not judged yet"
        sign, verdict = ("<=", "refined") if self.round.refined else (">", "raw")
        return f"JCM {self.round.jcm_score:.2f} {sign} {self.beta:g}: {verdict}"

    @property
    def caption(self) -> str:
        """The history strip's caption: "R2 (ref 1): question"."""
        ref = f" (ref {self.round.ref})" if self.round.ref is not None else ""
        return f"R{self.round.number}{ref}: {self.round.query}"

    def line(self, shape: tuple[int, int]) -> str:
        """One line: answer, mask area and share, JCM and latency."""
        ref = f" (refers to round {self.round.ref})" if self.round.ref is not None else ""
        share = 100 * self.round.area / (shape[0] * shape[1])
        return (f"round {self.round.number}{ref}: {self.round.answer} | mask {self.round.area:,} px ({share:.1f}%) "
                f"| {self.jcm} | {1000 * self.round.seconds:.0f} ms")


class AppSession:
    """One tab's image, chat session, clicked reference and JCM settings; see the module docstring.

    ``model_name`` is the ``--model`` the app was started with (None: the shipped model), for the replay
    command. ``beta`` must be what ``checked_betas`` allows for the model (None: JCM off)."""

    def __init__(self, model: Any, folder: str | Path, beta: float | None, jcm_rounds: str | None = None,
                 model_name: str | None = None):
        self.model = model
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.beta = beta
        self.jcm_rounds = jcm_rounds or model.config.heads.jcm_rounds
        self.model_name = model_name
        self.source: str | None = None
        self.image_path: Path | None = None
        self.image: np.ndarray | None = None
        self.volume: Volume | None = None
        self.chat: ChatSession | None = None
        self.selected: int | None = None
        self.asked_with: list[dict] = []

    # -- the image --------------------------------------------------------------------------------------

    def open_files(self, paths: Sequence[str | Path]) -> None:
        """Use the uploaded file(s): one PNG/JPEG image, one NIfTI file, or the files of one DICOM series
        (several files, or one ``.dcm``). The earlier image and its rounds are dropped."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise PageError("no file given: upload a PNG/JPEG image, a NIfTI file or a DICOM series")
        first = paths[0]
        name = first.name.lower()
        uploads = self.folder / UPLOADS_FOLDER
        try:
            if len(paths) == 1 and name.endswith(IMAGE_ENDINGS):
                self._show(load_image(first), first.name)
                self.volume = None
                return
            if len(paths) == 1 and name.endswith(NIFTI_ENDINGS):
                volumes_extra_ready(first)
                scan = read_scan(first)
            elif len(paths) > 1 or name.endswith(DICOM_ENDING):
                series = uploads / "dicom"
                shutil.rmtree(series, ignore_errors=True)
                series.mkdir(parents=True)
                for path in paths:
                    shutil.copyfile(path, series / safe_name(path.name))
                volumes_extra_ready(series)
                scan = read_scan(series)
            else:
                raise PageError(f"{first.name}: not a PNG/JPEG image (.png, .jpg, .jpeg), a NIfTI file (.nii, "
                                ".nii.gz) or the .dcm files of one DICOM series")
        except DataError as error:
            # The upload's temporary folder says nothing to the user: the error names the file alone.
            raise DataError(Path(error.file).name, error.item, error.field, error.reason) from None
        window, bounds = scan_window(scan, "auto")
        volume = Volume(scan, "auto", window, bounds, int(scan.intensities.shape[2]) // 2)
        self._show_slice(volume, first.name if len(paths) == 1 else f"{len(paths)} DICOM files")

    def select_slice(self, index: int) -> None:
        """Show axial slice ``index`` of the uploaded volume (a new image: its rounds start over)."""
        volume = self._volume()
        if not 0 <= index < volume.count:
            raise PageError(f"slice {index}: the volume has slices 0..{volume.count - 1}")
        if index != volume.index or self.image is None:
            self._show_slice(Volume(volume.scan, volume.window, volume.resolved, volume.bounds, index), self.source)

    def set_window(self, window: str) -> None:
        """Window the volume's slices with ``window`` (a ``--window`` value: a name or ``LEVEL,WIDTH``)."""
        volume = self._volume()
        resolved, bounds = scan_window(volume.scan, window)
        self._show_slice(Volume(volume.scan, window, resolved, bounds, volume.index), self.source)

    def _volume(self) -> Volume:
        if self.volume is None:
            raise PageError("no volume uploaded: slices and windows are for NIfTI files and DICOM series")
        return self.volume

    def _show_slice(self, volume: Volume, source: str | None) -> None:
        self._show(slice_image(volume.scan, volume.index, volume.bounds), source,
                   f"{volume.scan.case}-axial-{volume.index:03d}.png")
        self.volume = volume

    def _show(self, image: np.ndarray, source: str | None, name: str | None = None) -> None:
        """Make ``image`` the session's image (written into a fresh ``session/`` as a PNG, or as the
        uploaded file's bytes re-encoded losslessly) and drop the earlier image's rounds."""
        session = self.folder / SESSION_FOLDER
        shutil.rmtree(session, ignore_errors=True)
        session.mkdir(parents=True)
        self.image_path = session / safe_name(Path(name or source or "image.png").with_suffix(".png").name)
        save_image(self.image_path, image)
        self.image, self.source = image, source
        self.chat, self.selected, self.asked_with = None, None, []

    # -- the rounds -------------------------------------------------------------------------------------

    def ask(self, line: str) -> ChatRound:
        """Ask ``line`` (``@N`` refers to round N; otherwise the clicked round, if any, is the reference)."""
        if self.image_path is None:
            raise PageError("upload an image first")
        if not line.strip():
            raise QuestionError("empty question: type what to segment")
        question = parse_question(line)
        ref = question.ref if question.ref is not None else self.selected
        if self.chat is None:
            self.chat = ChatSession(self.model, self.image_path, self.beta, self.image_path.parent / ROUNDS_FOLDER,
                                    self.jcm_rounds)
        answered = self.chat.ask(question.query, ref)
        self.asked_with.append({"round": answered.number, "beta": self.beta, "jcm_rounds": self.jcm_rounds})
        self.selected = None
        self._save()
        return answered

    def select(self, number: int) -> int | None:
        """Make round ``number`` the next question's reference, or clear it when it already is; returns
        the reference now selected."""
        rounds = self.rounds
        if not 1 <= number <= len(rounds):
            raise QuestionError(f"there is no round {number} to refer to (rounds: "
                                f"{f'1..{len(rounds)}' if rounds else 'none yet'})")
        self.selected = None if self.selected == number else number
        return self.selected

    def undo(self) -> ChatRound:
        """Forget the last round (as ``chat``'s ``:undo``); returns it."""
        if self.chat is None:
            raise QuestionError("nothing to undo")
        undone = self.chat.undo()
        self.asked_with.pop()
        if self.selected is not None and self.selected > len(self.chat.rounds):
            self.selected = None
        self._save()
        return undone

    def reset(self) -> None:
        """Start over on the same image (not encoded again)."""
        if self.chat is not None:
            self.chat.reset()
        self.selected, self.asked_with = None, []
        self._save()

    def set_beta(self, beta: float | None) -> None:
        """The JCM threshold of the next rounds (None: off); ``CheckpointError`` for a threshold on a model
        without trained JCM weights."""
        if beta is not None and not 0.0 <= beta <= 1.0:
            raise PageError(f"beta {beta:g} is outside [0, 1]")
        [self.beta] = checked_betas((beta,), self.model.config, self.model_name or "the shipped model")
        if self.chat is not None:
            self.chat.beta = self.beta

    def set_jcm_rounds(self, jcm_rounds: str) -> None:
        """Which rounds JCM judges from the next round on: ``referred`` or ``all`` (as ``--jcm-rounds``)."""
        if jcm_rounds not in JCM_ROUNDS:
            raise PageError(f"jcm-rounds {jcm_rounds!r}: choose {' or '.join(JCM_ROUNDS)}")
        self.jcm_rounds = jcm_rounds
        if self.chat is not None:
            self.chat.jcm_rounds = jcm_rounds

    @property
    def rounds(self) -> list[ChatRound]:
        return [] if self.chat is None else self.chat.rounds

    def views(self) -> list[RoundView]:
        """Every round with its overlay, oldest first."""
        betas = {entry["round"]: entry["beta"] for entry in self.asked_with}
        return [RoundView(r, mask_overlay(self.image, r.mask), betas.get(r.judged_at, self.beta)) for r in self.rounds]

    # -- the download -----------------------------------------------------------------------------------

    def replay_command(self) -> str:
        """The ``mediround infer`` line that predicts the session's masks from ``session.jsonl``."""
        beta = "off" if self.beta is None else f"{self.beta:g}"
        model = "" if self.model_name is None else f" --model {self.model_name}"
        return f"mediround infer {DIALOGUE_FILE} --generate --beta {beta} --jcm-rounds {self.jcm_rounds}{model}"

    def _save(self) -> None:
        """Rewrite ``session.jsonl`` and ``session.json`` (both removed while there is no round)."""
        session = self.folder / SESSION_FOLDER
        if not self.rounds:
            for name in (DIALOGUE_FILE, SETTINGS_FILE):
                (session / name).unlink(missing_ok=True)
            return
        self.chat.save(session / DIALOGUE_FILE)
        settings = {(entry["beta"], entry["jcm_rounds"]) for entry in self.asked_with}
        source = {"file": self.source, "image": self.image_path.name}
        if self.volume is not None:
            source.update(case=self.volume.scan.case, axial_slice=self.volume.index, window=self.volume.resolved)
        write_json(session / SETTINGS_FILE, {
            "source": source, "model": self.model_name or "the shipped tiny model", "rounds": self.asked_with,
            "replay": self.replay_command() if len(settings) == 1 else None,
            "note": None if len(settings) == 1 else "the rounds were asked with different JCM settings; `mediround "
            "infer` replays every round with one --beta and --jcm-rounds, so its masks may differ where they did",
        })

    def archive(self) -> Path:
        """The session as a zip (``session/`` under one folder named after the image); ``QuestionError``
        while there is no round."""
        if not self.rounds:
            raise QuestionError("no rounds to download yet")
        session = self.folder / SESSION_FOLDER
        name = f"mediround-session-{self.image_path.stem}"
        path = self.folder / f"{name}.zip"
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(p for p in session.rglob("*") if p.is_file()):
                archive.write(file, f"{name}/{file.relative_to(session).as_posix()}")
        return path

    def close(self) -> None:
        """Remove the tab's folder (uploads, image, rounds, zip)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def error_line(error: BaseException) -> str:
    """The one line the page shows for ``error``: its text, with no traceback and no line break (the
    exception's type first when it is not one of the library's own errors)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, MediRoundError) else f"{type(error).__name__}: {text}"
