"""Score a ``chat VOLUME`` output against a ground-truth label volume: Dice per round, in 3-D and per
axial slice (``mediround eval TRUTH --predictions OUT --round-labels 1=6,2=6+7``).

``--round-labels`` says which label value(s) of the truth each round should match (``2=6+7``: round 2's
mask against labels 6 and 7 together), written inline or as a JSON file (``{"1": 6, "2": [6, 7]}``).
The truth is a NIfTI label volume, or a DICOM series folder holding its labels as ``build-dialogues``
reads them (``labels.nii.gz`` on the series' grid, or a DICOM-SEG object beside the slices). The
prediction is the output folder's sidecar and what it names: each round's whole mask from its
``--per-round`` NIfTI when there is one, else from the label volume (where a later round covers it, the
voxels count as missed, and the evaluation says how many), or each round's segment of the DICOM-SEG
object (placed on the truth's series; a SEG of another series is refused). Both lie on one RAS+ grid
(checked: shape and affine) before any voxel is compared.

A slice scores where the truth or the prediction has a voxel of the round on it; a round that neither
has anywhere has no Dice (None). The evaluation is written as ``<case>_eval.json`` beside the sidecar.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mediround.atomic import write_json
from mediround.data.build.sources import NIFTI_ENDINGS
from mediround.data.build.volumes import (
    DicomSeries,
    canonical_grid,
    find_dicom_seg,
    load_dicom_seg,
    optional_module,
    ras_affine,
    read_dicom_seg,
    read_dicom_series,
    read_nifti,
    segment_volume,
)
from mediround.data.scan_outputs import SIDECAR_FORMAT
from mediround.errors import DataError

GRID_TOLERANCE_MM = 1e-3
"""Two grids are one when their shapes are equal and their affines agree to this (NIfTI stores float32)."""


def parse_round_labels(text: str) -> dict[int, tuple[int, ...]]:
    """``"1=6,2=6+7"`` -> ``{1: (6,), 2: (6, 7)}``; a ``.json`` file or an existing file is read as
    ``{"1": 6, "2": [6, 7]}``. ``DataError`` naming the mapping (or file) otherwise."""
    if text.endswith(".json") or Path(text).is_file():
        try:
            loaded = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(text, None, None, f"cannot read the round-labels mapping: {error}") from None
        if not isinstance(loaded, dict) or not loaded:
            raise DataError(text, None, None, 'expected an object of round -> label(s), e.g. {"1": 6, "2": [6, 7]}')
        pairs = [(str(key), value if isinstance(value, list) else [value]) for key, value in loaded.items()]
        source = text
    else:
        pairs = []
        for part in text.split(","):
            round_, _, labels = part.partition("=")
            pairs.append((round_.strip(), labels.split("+") if labels else []))
        source = "--round-labels"
    mapping: dict[int, tuple[int, ...]] = {}
    for round_, labels in pairs:
        words = [str(label).strip() for label in labels]
        if not re.fullmatch(r"\d+", round_) or not words or not all(re.fullmatch(r"\d+", w) for w in words):
            raise DataError(source, None, None, f"{round_!r}: expected ROUND=LABEL[+LABEL...] with whole numbers, "
                            "e.g. 1=6,2=6+7")
        if int(round_) in mapping:
            raise DataError(source, None, None, f"round {int(round_)} is mapped twice")
        mapping[int(round_)] = tuple(int(w) for w in words)
    return mapping


@dataclass
class SliceScore:
    """One axial slice of one round: truth and predicted voxels there, and their Dice."""

    slice: int
    truth: int
    predicted: int
    dice: float


@dataclass
class RoundScore:
    """One round over the volume: the labels it is scored against, voxel counts, the 3-D Dice (None when
    neither truth nor prediction has a voxel) and its slices' Dice."""

    round: int
    question: str
    labels: tuple[int, ...]
    truth_voxels: int
    predicted_voxels: int
    dice: float | None
    slices: list[SliceScore] = field(default_factory=list)

    @property
    def mean_slice_dice(self) -> float | None:
        return float(np.mean([s.dice for s in self.slices])) if self.slices else None


@dataclass
class VolumeEvaluation:
    """Every mapped round's scores, where the prediction's masks came from, notes on what the scores
    cannot see, and the JSON file written."""

    truth: str
    predictions: str
    case: str
    masks_from: str
    rounds: list[RoundScore]
    notes: list[str]
    out: Path

    def as_dict(self) -> dict:
        rounds = [{**asdict(r), "mean_slice_dice": r.mean_slice_dice} for r in self.rounds]
        return {"truth": self.truth, "predictions": self.predictions, "case": self.case,
                "masks_from": self.masks_from, "notes": self.notes, "rounds": rounds}


def find_sidecar(folder: Path) -> tuple[Path, dict]:
    """The one ``chat VOLUME`` sidecar in ``folder`` and its content."""
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(content, dict) and content.get("format") == SIDECAR_FORMAT:
            found.append((path, content))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p, _ in found)})"
        raise DataError(str(folder), None, None, f"{what} `chat VOLUME` output sidecars: give the folder of one scan's output")
    return found[0]


def _nifti_grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return canonical_grid(read_nifti(path), str(path))


def read_truth(path: Path) -> tuple[np.ndarray, np.ndarray, DicomSeries | None]:
    """The truth's label values (RAS+, integers), its RAS+ affine, and its DICOM series when it has one."""
    if not path.is_dir():
        if not path.name.endswith(NIFTI_ENDINGS):
            raise DataError(str(path), None, None, "not a NIfTI label volume (.nii, .nii.gz) or a DICOM series folder")
        voxels, affine = _nifti_grid(path)
        return np.rint(voxels).astype(np.int32), affine, None
    series = read_dicom_series(path)
    nifti = next((path / f"labels{e}" for e in NIFTI_ENDINGS if (path / f"labels{e}").is_file()), None)
    if nifti is not None:
        voxels, affine = _nifti_grid(nifti)
        return np.rint(voxels).astype(np.int32), affine, series
    seg = find_dicom_seg(path)
    if seg is None:
        raise DataError(str(path), None, None, "no labels.nii.gz and no DICOM-SEG object beside the DICOM series")
    labels, _ = load_dicom_seg(seg, series)
    first = series.slices[0]
    return labels, ras_affine(series.affine, (first.Columns, first.Rows, len(series.slices)), str(path)), series


def _same_grid(truth: Path, truth_shape: tuple, truth_affine: np.ndarray, file: Path, shape: tuple,
               affine: np.ndarray) -> None:
    if tuple(shape) != tuple(truth_shape) or not np.allclose(affine, truth_affine, atol=GRID_TOLERANCE_MM):
        raise DataError(str(file), None, None, f"lies on another grid than {truth} (RAS+ shape {tuple(shape)} vs "
                        f"{tuple(truth_shape)}, or another affine): score an output of chat on that scan")


def _seg_of_series(seg_path: Path, series: DicomSeries) -> None:
    """Refuse a DICOM-SEG that references another series than ``series`` (UIDs never printed)."""
    seg = optional_module("pydicom", str(seg_path)).dcmread(str(seg_path), stop_before_pixels=True)
    referenced = {str(item.SeriesInstanceUID) for item in getattr(seg, "ReferencedSeriesSequence", [])}
    if str(getattr(series.slices[0], "SeriesInstanceUID", "")) not in referenced:
        raise DataError(str(seg_path), None, "ReferencedSeriesSequence", f"references another series than the one in "
                        f"{series.folder}")


def _predicted_masks(folder: Path, sidecar: dict, rounds: list[int], truth: Path, shape: tuple, affine: np.ndarray,
                     series: DicomSeries | None, notes: list[str]) -> tuple[str, dict[int, np.ndarray]]:
    files = sidecar.get("files", {})
    if "seg" in files:
        if series is None:
            raise DataError(str(folder / files["seg"]), None, None, "a DICOM-SEG output is scored against its DICOM "
                            "series: give the series folder (with labels.nii.gz or a DICOM-SEG of the truth) as the truth")
        _seg_of_series(folder / files["seg"], series)
        _, frames = read_dicom_seg(folder / files["seg"], series)
        masks = {number: segment_volume(series, frames, number) for number in rounds}
        for mask in masks.values():
            _same_grid(truth, shape, affine, folder / files["seg"], mask.shape, affine)
        return "DICOM-SEG segments", masks
    per_round = files.get("rounds", {})
    masks = {}
    for number in rounds:
        name = per_round.get(str(number), files["labels"])
        voxels, grid = _nifti_grid(folder / name)
        _same_grid(truth, shape, affine, folder / name, voxels.shape, grid)
        masks[number] = voxels > 0 if str(number) in per_round else np.rint(voxels) == number
    if per_round:
        return "per-round NIfTI files", masks
    for label in sidecar["labels"]:
        hidden = label["voxels"] - (label["voxels_in_label_volume"] or 0)
        if label["round"] in rounds and hidden > 0:
            notes.append(f"round {label['round']}: {hidden} of its {label['voxels']} voxels lie under a later round's "
                         "label in the label volume and count as missed; chat --per-round writes its whole mask")
    return "label volume", masks


def score_volume(truth: str | Path, predictions: str | Path, round_labels: dict[int, tuple[int, ...]]) -> VolumeEvaluation:
    """Score the ``chat VOLUME`` output in the folder ``predictions`` against ``truth`` (see the module
    docstring); writes ``<case>_eval.json`` into ``predictions``."""
    truth, predictions = Path(truth), Path(predictions)
    sidecar_path, sidecar = find_sidecar(predictions)
    questions = {label["round"]: label["question"] for label in sidecar["labels"]}
    for number in round_labels:
        if number not in questions:
            raise DataError("--round-labels", None, None, f"round {number}: {sidecar_path} has rounds 1..{len(questions)}")
    labels, affine, series = read_truth(truth)
    present = set(np.unique(labels).tolist())
    for number, wanted in round_labels.items():
        missing = [value for value in wanted if value not in present]
        if missing:
            raise DataError(str(truth), None, "--round-labels", f"round {number} maps to label {missing[0]}, which the "
                            f"volume lacks (labels: {', '.join(map(str, sorted(present - {0}))) or 'none'})")
    notes: list[str] = []
    masks_from, masks = _predicted_masks(predictions, sidecar, sorted(round_labels), truth, labels.shape, affine,
                                         series, notes)
    scores = [_score_round(number, questions[number], wanted, np.isin(labels, wanted), masks[number])
              for number, wanted in sorted(round_labels.items())]
    out = predictions / f"{sidecar['case']}_eval.json"
    evaluation = VolumeEvaluation(str(truth), str(predictions), sidecar["case"], masks_from, scores, notes, out)
    write_json(out, evaluation.as_dict())
    return evaluation


def _score_round(number: int, question: str, wanted: tuple[int, ...], truth: np.ndarray,
                 predicted: np.ndarray) -> RoundScore:
    inter = (truth & predicted).sum(axis=(0, 1))
    in_truth, in_prediction = truth.sum(axis=(0, 1)), predicted.sum(axis=(0, 1))
    total = int(in_truth.sum() + in_prediction.sum())
    dice = 2.0 * float(inter.sum()) / total if total else None
    slices = [SliceScore(int(k), int(in_truth[k]), int(in_prediction[k]),
                         2.0 * float(inter[k]) / float(in_truth[k] + in_prediction[k]))
              for k in np.nonzero(in_truth + in_prediction)[0]]
    return RoundScore(number, question, wanted, int(in_truth.sum()), int(in_prediction.sum()), dice, slices)
