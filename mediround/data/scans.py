"""A scan in, label volumes out: the data side of ``mediround chat VOLUME`` (no model here).

A scan is a NIfTI file (``.nii``, ``.nii.gz``) or the folder of one DICOM series, read, reoriented to
RAS+ and cut into axial slices exactly as ``build-dialogues`` does (``mediround.data.build.volumes``):
the same radiological display, the same ``--window`` mapping, the same ``--slices`` values, so a model
trained on built dialogues sees at inference the pixels it was trained on. ``run_scan`` hands the
selected slices to a segmenter (the model's batched rounds in ``mediround.inference.volumes``; a stub in
tests), gathers each slice's round masks back on the scan's grid and writes the outputs
(``mediround.data.scan_outputs``).

Memory: the scan's intensities (as read: the file's type, float64 for DICOM and scaled NIfTI), one bit
volume holding every round's masks (a bit per round: uint8 up to 8 rounds), per-slice counts, and what
the segmenter holds for the slices in flight; a slice's image is made when the segmenter asks for it.
A ``percentile`` window reads the whole volume once for its percentiles (one transient copy in the
volume's own type), before the bit volume exists. Writing the outputs adds one uint8 volume at a time
(the label volume, a round's mask; the DICOM-SEG's frames: one bool volume per round), each made slice
by slice. benchmarks/volume_memory.py measures it.

Patient data: the case id (file names, sidecar, messages) is the user's ``case_id``, else the NIfTI
file's name, else ``series-`` and 12 hex digits of the SHA-256 of the DICOM SeriesInstanceUID; no header
value of a DICOM series is written anywhere but in the DICOM-SEG object.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mediround.data.build.sources import NIFTI_ENDINGS, nifti_modality
from mediround.data.build.volumes import (
    DicomSeries,
    SliceRule,
    canonical,
    check_window,
    display_slice,
    optional_module,
    read_dicom_series,
    read_nifti,
    resolve_window,
    undo_display,
    window_bounds,
)
from mediround.data.dialogue import Round
from mediround.data.images import apply_window, grey_to_rgb
from mediround.data.scan_outputs import write_outputs
from mediround.errors import DataError

MAX_ROUNDS = 64
"""Rounds one bit volume holds (a bit each, in uint64 at most)."""
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A case id is part of every output file name: letters, digits, '.', '_', '-', at most 64."""
AXIAL = 2
"""The axial axis of a RAS+ volume (inferior to superior)."""

Segmenter = Callable[[Sequence[int], Callable[[int], np.ndarray]], Iterator[tuple[int, list[np.ndarray]]]]
"""(axial slice indices, index -> RGB uint8 slice image) -> (index, one (H, W) bool mask per round) for
every index, in any order; the images are asked for as the segmenter needs them."""


@dataclass
class Scan:
    """One 3-D scan: ``intensities`` in RAS+ (``build-dialogues``' reading), the grid it was read on
    (``native_affine`` maps native voxel indices to RAS millimetres: the NIfTI file's grid, or the DICOM
    series' columns, rows and slices in order along the slice normal), and what writing back needs."""

    file: str
    kind: str
    case: str
    intensities: np.ndarray
    modality: str | None
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]
    header: Any = None
    series: DicomSeries | None = None

    @property
    def orientation(self) -> np.ndarray:
        """nibabel's orientation of the native grid (what ``as_closest_canonical`` undoes)."""
        return optional_module("nibabel.orientations", self.file).io_orientation(self.native_affine)

    @property
    def voxel_ml(self) -> float:
        """One voxel's volume in millilitres."""
        return abs(float(np.linalg.det(self.native_affine[:3, :3]))) / 1000.0

    def to_native(self, volume: np.ndarray) -> np.ndarray:
        """A volume on the RAS+ grid back on the native grid (a view: flips and axis swaps only)."""
        orientations = optional_module("nibabel.orientations", self.file)
        back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), self.orientation)
        return orientations.apply_orientation(volume, back)


def read_scan(path: str | Path, case_id: str | None = None) -> Scan:
    """The scan at ``path`` (a NIfTI file or a DICOM series folder); ``DataError`` naming the file and the
    problem for anything else, an unreadable file, a 4-D file of several volumes, a folder that is not
    one series, or a ``case_id`` that cannot be a file name."""
    path = Path(path)
    if case_id is not None and CASE_ID.fullmatch(case_id) is None:
        raise DataError("--case-id", None, None, f"{case_id!r}: use letters, digits, '.', '_' and '-' (at most 64, "
                        "starting with a letter or digit); it names the output files")
    if path.is_dir():
        return _read_dicom(path, case_id)
    if not path.exists() or not path.name.endswith(NIFTI_ENDINGS):
        problem = "not found" if not path.exists() else "not a NIfTI file (.nii, .nii.gz)"
        raise DataError(str(path), None, None, f"{problem}: give a NIfTI file or the folder of one DICOM series")
    image = read_nifti(path)
    stem = path.name[: -len(next(e for e in NIFTI_ENDINGS if path.name.endswith(e)))]
    case = case_id or re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:64] or "scan"
    return Scan(str(path), "nifti", case, canonical(image, str(path)), nifti_modality(path), np.asarray(image.affine),
                tuple(int(n) for n in image.shape), header=image.header)


def series_case_id(series: DicomSeries) -> str:
    """``series-`` and the first 12 hex digits of the SHA-256 of the series' SeriesInstanceUID."""
    uid = str(getattr(series.slices[0], "SeriesInstanceUID", "") or "")
    if not uid:
        raise DataError(str(series.folder), None, "SeriesInstanceUID", "missing: the series cannot be named or "
                        "referenced; give --case-id")
    return "series-" + hashlib.sha256(uid.encode("ascii")).hexdigest()[:12]


def _read_dicom(folder: Path, case_id: str | None) -> Scan:
    series = read_dicom_series(folder)
    case = case_id or series_case_id(series)
    first = series.slices[0]
    shape = (int(first.Columns), int(first.Rows), len(series.slices))
    return Scan(str(folder), "dicom", case, series.intensities(keep_pixels=False), series.modality,
                series.affine, shape, series=series)


@dataclass(frozen=True)
class ScanOptions:
    """How a scan is run: ``slices`` as ``parse_slices`` gives it, a ``--window`` value, round masks
    written one file per round too (``per_round``), and what the sidecar records about the model."""

    slices: tuple[str, tuple[int | None, int | None] | None] = ("every", None)
    window: str = "auto"
    per_round: bool = False
    model: dict = field(default_factory=dict)


def scan_window(scan: Scan, window: str) -> tuple[str, tuple[float, float]]:
    """The ``--window`` value ``window`` resolved for ``scan`` (what ``auto`` stands for) and its (low,
    width) on the scan's intensities; ``DataError`` for a value that is no window."""
    try:
        resolved = resolve_window(check_window(window), scan.modality)
    except ValueError as error:
        raise DataError("--window", None, None, str(error)) from None
    return resolved, window_bounds(scan.intensities, resolved)


def slice_image(scan: Scan, index: int, bounds: tuple[float, float]) -> np.ndarray:
    """Axial slice ``index`` as the RGB uint8 image a model sees: shown as ``build-dialogues`` shows it
    and windowed to ``bounds`` (``scan_window``)."""
    return grey_to_rgb(apply_window(display_slice(scan.intensities, "axial", index), *bounds))


def selected_slices(scan: Scan, slices: tuple[str, tuple[int | None, int | None] | None]) -> range:
    """The axial slices a run segments: all of them for ``every`` and ``largest`` (which keeps, after the
    run, each round's largest slice), slices A..B-1 for ``A:B``."""
    rule, span = slices
    return SliceRule(rule, span=span).indices(scan.intensities.shape[AXIAL], scan.file, "axial")


class RoundMasks:
    """Every round's mask on a RAS+ grid as one bit volume (bit r-1 for round r), and per axial slice and
    round the mask's voxel count."""

    def __init__(self, shape: tuple[int, int, int], rounds: int):
        if not 1 <= rounds <= MAX_ROUNDS:
            raise ValueError(f"1 to {MAX_ROUNDS} rounds, got {rounds}")
        dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(t).bits >= rounds)
        self.bits = np.zeros(shape, dtype)
        self.rounds = rounds
        self.areas = np.zeros((shape[AXIAL], rounds), np.int64)

    def put(self, index: int, masks: Sequence[np.ndarray]) -> None:
        """Axial slice ``index``'s round masks, as the slice was shown (``display_slice``)."""
        plane = self.bits[:, :, index]
        if len(masks) != self.rounds:
            raise ValueError(f"slice {index}: {len(masks)} masks for {self.rounds} rounds")
        for number, mask in enumerate(masks):
            native = undo_display(np.asarray(mask, dtype=bool))
            if native.shape != plane.shape:
                raise ValueError(f"slice {index}: a mask of {mask.shape} for a slice shown as {plane.T.shape}")
            plane[native] |= self.bits.dtype.type(1 << number)
            self.areas[index, number] = int(native.sum())

    def keep_largest(self) -> None:
        """Keep each round's mask on its largest slice only (``--slices largest``)."""
        for number in range(self.rounds):
            largest = int(np.argmax(self.areas[:, number]))
            others = np.ones(self.areas.shape[0], bool)
            others[largest] = False
            self.bits[:, :, others] &= self.bits.dtype.type(~(1 << number) & np.iinfo(self.bits.dtype).max)
            self.areas[others, number] = 0

    def round_mask(self, number: int) -> np.ndarray:
        """Round ``number``'s (1-based) mask as a uint8 0/1 volume (made slice by slice: no other
        volume-sized temporary)."""
        bit = self.bits.dtype.type(1 << (number - 1))
        mask = np.empty(self.bits.shape, np.uint8)
        for index in range(self.bits.shape[AXIAL]):
            mask[:, :, index] = (self.bits[:, :, index] & bit) != 0
        return mask

    def label_volume(self) -> tuple[np.ndarray, list[int]]:
        """uint8 label volume: round r's voxels hold r; where rounds overlap, the later round's label
        (made slice by slice); and how many voxels hold each round's label (index r - 1)."""
        labels = np.zeros(self.bits.shape, np.uint8)
        counts = np.zeros(self.rounds + 1, np.int64)
        for index in range(self.bits.shape[AXIAL]):
            plane, bits = labels[:, :, index], self.bits[:, :, index]
            for number in range(1, self.rounds + 1):
                plane[(bits & self.bits.dtype.type(1 << (number - 1))) != 0] = number
            counts += np.bincount(plane.ravel(), minlength=self.rounds + 1)
        return labels, [int(count) for count in counts[1:]]


@dataclass
class RoundSummary:
    """One round over the whole scan: its label value (its number), its question and reference, its
    voxels and millilitres, the axial slices where it has a mask, and how many of its voxels the label
    volume shows (fewer where a later round's mask lies over it; None without a label volume)."""

    round: int
    question: str
    refers_to: int | None
    voxels: int
    ml: float
    slices_with_mask: list[int]
    voxels_in_label_volume: int | None = None

    def as_dict(self) -> dict:
        return {"label": self.round, "round": self.round, "question": self.question, "refers_to": self.refers_to,
                "voxels": self.voxels, "ml": round(self.ml, 4), "slices_with_mask": self.slices_with_mask,
                "voxels_in_label_volume": self.voxels_in_label_volume}


@dataclass
class ScanResult:
    """What ``run_scan`` did: the scan's case id, the window used (and what ``auto`` stood for), the
    slices run, the rounds' summaries, and the files written (by kind)."""

    scan: Scan
    window: str
    slices: list[int]
    rounds: list[RoundSummary]
    files: dict[str, Any]


def check_questions(questions: Sequence[Round]) -> None:
    """``DataError`` for no question, too many, an empty one or a reference to a round that is not an
    earlier one (the questions are the same on every slice, so one check covers them all)."""
    if not 1 <= len(questions) <= MAX_ROUNDS:
        raise DataError("-q", None, None, f"give 1 to {MAX_ROUNDS} questions with -q, got {len(questions)}")
    for number, question in enumerate(questions, start=1):
        if not question.query.strip():
            raise DataError("-q", f"question {number}", None, "empty question")
        if question.ref is not None and not 1 <= question.ref < number:
            raise DataError("-q", f"question {number}", "@N", f"refers to round {question.ref}, which is not an earlier round")


def run_scan(scan: Scan, questions: Sequence[Round], segmenter: Segmenter, out: str | Path,
             options: ScanOptions = ScanOptions(), progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Run ``questions`` (a multi-round dialogue; ``Round.ref`` is the round a question refers to) on the
    selected axial slices of ``scan`` with ``segmenter``, and write the outputs into ``out``;
    ``progress(done, total)`` hears of each slice done."""
    check_questions(questions)
    window, bounds = scan_window(scan, options.window)
    indices = selected_slices(scan, options.slices)

    def image(index: int) -> np.ndarray:
        return slice_image(scan, index, bounds)

    masks = RoundMasks(scan.intensities.shape, len(questions))
    for done, (index, round_masks) in enumerate(segmenter(indices, image), start=1):
        masks.put(index, round_masks)
        if progress is not None:
            progress(done, len(indices))
    if options.slices[0] == "largest":
        masks.keep_largest()
    rounds = [
        RoundSummary(number, question.query, question.ref, int(masks.areas[:, number - 1].sum()),
                     float(masks.areas[:, number - 1].sum()) * scan.voxel_ml,
                     [int(k) for k in np.nonzero(masks.areas[:, number - 1])[0]])
        for number, question in enumerate(questions, start=1)
    ]
    result = ScanResult(scan, window, list(indices), rounds, {})
    result.files = write_outputs(result, masks, Path(out), options)
    return result


def is_scan(path: str | Path) -> bool:
    """Whether ``chat`` reads ``path`` as a scan: a folder (a DICOM series) or a NIfTI file name."""
    path = Path(path)
    return path.is_dir() or path.name.endswith(NIFTI_ENDINGS)


def volumes_extra_ready(path: str | Path) -> None:
    """Fail early, before a model loads, when the ``volumes`` extra a scan needs is missing."""
    for name in ("nibabel", "pydicom", "highdicom") if Path(path).is_dir() else ("nibabel",):
        optional_module(name, str(path))
