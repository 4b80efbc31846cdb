"""3-D label volumes to 2-D slices: NIfTI and DICOM reading, display orientation, windowing, slice rules.

Every volume is reoriented to RAS+ (nibabel's closest canonical orientation) and sliced for display in
the radiological convention: axial and coronal slices show the patient's right on the image's left,
axial slices have anterior at the top, coronal and sagittal slices superior at the top, sagittal slices
anterior on the image's left. nibabel and pydicom are optional (the ``volumes`` extra) and imported
only here, when a volume is read.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mediround.data.images import WINDOW_PERCENTILES, apply_window
from mediround.errors import DataError

EXTRA_HINT = 'pip install "mediround[volumes]"'
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
CT_WINDOWS = {"abdomen": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
"""Named CT windows as (level, width) in Hounsfield units."""
INTENSITY_MAPS = (*CT_WINDOWS, "percentile")
WINDOWS = ("auto", *INTENSITY_MAPS)
"""Named ``--window`` values; ``LEVEL,WIDTH`` (numbers) is the other kind (``check_window``)."""
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
SLICE_RULES = ("every", "largest")


def optional_module(name: str, file: str):
    """Import one of the ``volumes`` extra's libraries, or say which extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(file, None, None, f"reading this source needs {name}: {EXTRA_HINT}") from None


@dataclass(frozen=True)
class SliceRule:
    """Which slices of a case become images: every ``step``-th slice holding at least ``min_labels``
    labels, or, with ``rule == "largest"``, the slice with the largest area of each label (of ``label``
    only when given). ``span`` (start, stop) keeps ``every`` to slices start, ..., stop - 1 (0-based, as
    image ids number them; None: from the first, to the last)."""

    rule: str = "every"
    step: int = 1
    min_labels: int = 2
    label: str | None = None
    span: tuple[int | None, int | None] | None = None

    def indices(self, count: int, file: str, axis: str = "axial") -> range:
        """The slice indices ``every`` walks over a volume of ``count`` slices along ``axis``;
        ``DataError`` when ``span`` does not lie inside the volume."""
        start, stop = self.span or (None, None)
        first, end = start or 0, count if stop is None else stop
        if not first < end <= count:
            written = f"{'' if start is None else start}:{'' if stop is None else stop}"
            raise DataError(file, None, "slices", f"slice range {written} lies outside the volume's {count} "
                            f"{axis} slices (0:{count})")
        return range(first, end, self.step)


def parse_slices(text: str) -> tuple[str, tuple[int | None, int | None] | None]:
    """A ``--slices`` value: ``every`` or ``largest`` -> (rule, None); ``A:B`` -> ("every", (A, B)),
    either end optional; ``ValueError`` otherwise."""
    value = "".join(text.split())
    if value in SLICE_RULES:
        return value, None
    match = re.fullmatch(r"(\d*):(\d*)", value)
    if match is None:
        raise ValueError(f"expected {'|'.join(SLICE_RULES)} or a slice range A:B (0-based, B excluded), got {text!r}")
    start, stop = (int(group) if group else None for group in match.groups())
    if start is not None and stop is not None and start >= stop:
        raise ValueError(f"slice range {value} is empty: A must be below B (B excluded)")
    return "every", (start, stop)


@dataclass
class Volume:
    """An intensity volume and its label volume on the same RAS+ grid; ``labels`` maps values to names."""

    intensities: np.ndarray
    labels: np.ndarray
    names: dict[int, str]


def canonical(image, file: str) -> np.ndarray:
    """The voxel array of a nibabel image reoriented to RAS+."""
    return canonical_grid(image, file)[0]


def canonical_grid(image, file: str) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array of a nibabel image reoriented to RAS+, and that array's voxel-to-RAS affine."""
    nibabel = optional_module("nibabel", file)
    try:
        reoriented = nibabel.as_closest_canonical(image)
        return np.asanyarray(reoriented.dataobj), np.asarray(reoriented.affine)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(file, None, None, f"unreadable volume: {error}") from None


def read_nifti(path: Path):
    """The nibabel image of a 3-D NIfTI file (header read, voxels not yet). A 4-D file of one volume
    (x, y, z, 1) is that volume; one of several volumes (a time series, channels) is refused, in
    ``build-dialogues`` and ``chat`` alike: which volume to read is the user's choice, not a default."""
    nibabel = optional_module("nibabel", str(path))
    try:
        image = nibabel.squeeze_image(nibabel.load(str(path)))
    except (FileNotFoundError, nibabel.filebasedimages.ImageFileError, OSError, EOFError) as error:
        raise DataError(str(path), None, None, f"not a readable NIfTI volume: {error}") from None
    if len(image.shape) == 4:
        raise DataError(str(path), None, None, f"4-D volume of {image.shape[3]} volumes {image.shape}: "
                        "MediRound reads one 3-D volume; save the one to use as a file of its own "
                        "(e.g. nibabel's image.slicer[..., 0])")
    if len(image.shape) != 3:
        raise DataError(str(path), None, None, f"{len(image.shape)}-D image {image.shape}: not a 3-D volume")
    return image


def load_nifti(path: Path) -> np.ndarray:
    """A 3-D NIfTI file's voxels in RAS+ (``read_nifti`` says which files are refused)."""
    return canonical(read_nifti(path), str(path))


def ras_affine(affine: np.ndarray, shape: tuple[int, ...], file: str) -> np.ndarray:
    """The voxel-to-RAS affine of a grid (``affine``, ``shape``) once reoriented to RAS+ as
    ``canonical`` reorients its voxels."""
    orientations = optional_module("nibabel.orientations", file)
    return affine @ orientations.inv_ornt_aff(orientations.io_orientation(affine), shape[:3])


@dataclass
class DicomSeries:
    """The image slices of a DICOM series, ordered along the slice normal, and the series' RAS affine
    (voxel axes: columns, rows, slices)."""

    folder: Path
    slices: list
    affine: np.ndarray
    modality: str | None

    def volume(self, planes: Iterable[np.ndarray], dtype: type) -> np.ndarray:
        """One (rows, columns) plane per slice, in slice order, as a RAS+ volume of ``dtype`` (filled
        plane by plane: no second copy of the volume)."""
        nibabel = optional_module("nibabel", str(self.folder))
        first = self.slices[0]
        voxels = np.empty((int(first.Columns), int(first.Rows), len(self.slices)), dtype)
        for index, plane in enumerate(planes):
            # pixel_array is (row, column); voxel axis 0 follows the columns (the row cosine) as in NIfTI.
            voxels[:, :, index] = plane.T
        return canonical(nibabel.Nifti1Image(voxels, self.affine), str(self.folder))

    def intensities(self, keep_pixels: bool = True) -> np.ndarray:
        """Rescaled (Hounsfield for CT) values in RAS+, each slice with its own slope and intercept.
        ``keep_pixels=False`` drops each slice's pixel data once read (the headers stay), so the series
        then holds only the volume this returns."""
        def rescaled() -> Iterator[np.ndarray]:
            for dataset in self.slices:
                slope, intercept = (float(getattr(dataset, keyword, default) or default)
                                    for keyword, default in (("RescaleSlope", 1), ("RescaleIntercept", 0)))
                yield pixels(dataset).astype(np.float64) * slope + intercept
                if not keep_pixels:
                    del dataset.PixelData

        return self.volume(rescaled(), np.float64)

    def slice_at(self, position: np.ndarray) -> int | None:
        """The slice whose ImagePositionPatient is ``position`` (to a tenth of the smallest spacing)."""
        spacing = [abs(float(v)) for v in self.slices[0].PixelSpacing] + [float(np.linalg.norm(self.affine[:3, 2]))]
        distances = np.linalg.norm(self.positions() - position, axis=1)
        index = int(np.argmin(distances))
        return index if distances[index] <= 0.1 * min(v for v in spacing if v > 0) else None

    def positions(self) -> np.ndarray:
        return np.array([d.ImagePositionPatient for d in self.slices], dtype=float)


def read_dicom_series(folder: Path) -> DicomSeries:
    """The image slices of the DICOM series in ``folder`` (DICOM-SEG objects and other files skipped).

    Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the
    cross product of the ImageOrientationPatient cosines), never by file name or InstanceNumber.
    """
    pydicom = optional_module("pydicom", str(folder))
    if not folder.is_dir():
        raise DataError(str(folder), None, None, "not a folder: give the folder of one DICOM series")
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(str(path))
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" not in dataset or getattr(dataset, "Modality", "") == "SEG":
            continue
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in dataset:
                raise DataError(str(path), None, keyword, "missing: the slice cannot be placed in the volume")
        slices.append(dataset)
    if not slices:
        raise DataError(str(folder), None, None, "no DICOM image slices found")
    _check_one_series(folder, slices)
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    slices.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    _check_even_spacing(slices, normal)
    row_spacing, column_spacing = (float(v) for v in slices[0].PixelSpacing)
    first = np.array(slices[0].ImagePositionPatient, dtype=float)
    step = (
        (np.array(slices[-1].ImagePositionPatient, dtype=float) - first) / (len(slices) - 1)
        if len(slices) > 1
        else normal * float(getattr(slices[0], "SliceThickness", 1) or 1)
    )
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * column_spacing
    affine_lps[:3, 1] = column_cosine * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = first
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    modality = {"MR": "MRI"}.get(str(getattr(slices[0], "Modality", "")), getattr(slices[0], "Modality", None))
    return DicomSeries(folder, slices, affine_ras, modality)


def _check_one_series(folder: Path, slices: list) -> None:
    """Refuse slices that do not make one volume: several series, or slices of other sizes, orientations
    or pixel spacings than the first (file names in the message, never header values: they may be PHI)."""
    series = {}
    for dataset in slices:
        series.setdefault(str(getattr(dataset, "SeriesInstanceUID", "")), Path(dataset.filename).name)
    if len(series) > 1:
        raise DataError(str(folder), None, "SeriesInstanceUID", f"{len(series)} series in one folder (first "
                        f"slices: {', '.join(sorted(series.values()))}): give the folder of one series")
    first = slices[0]
    for dataset in slices[1:]:
        for keyword in ("Rows", "Columns", "ImageOrientationPatient", "PixelSpacing"):
            mine, theirs = (np.array(getattr(d, keyword, np.nan), dtype=float) for d in (dataset, first))
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=1e-4):
                raise DataError(str(dataset.filename), None, keyword, f"differs from {Path(first.filename).name}'s: "
                                "the slices are not one volume")


def _check_even_spacing(slices: list, normal: np.ndarray) -> None:
    """Refuse slices (sorted along ``normal``) at one position or unevenly spaced: a volume's affine
    has one slice step, so a missing or doubled slice would misplace every slice after it."""
    offsets = np.array([float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))) for d in slices])
    steps = np.diff(offsets)
    if not steps.size:
        return
    spacing = float(np.median(steps))
    for index, step in enumerate(steps, start=1):
        if step < 1e-3 or abs(step - spacing) > 0.1 * spacing:
            raise DataError(str(slices[index].filename), None, "ImagePositionPatient",
                            f"{step:.4g} mm from {Path(slices[index - 1].filename).name} along the slice normal, "
                            f"but the series' slices are {spacing:.4g} mm apart: a missing or duplicate slice")


def pixels(dataset) -> np.ndarray:
    """The decoded pixel data of one DICOM slice; ``DataError`` naming its file and transfer syntax when
    the installed decoders cannot decode it."""
    try:
        return dataset.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, OSError) as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or str(syntax)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(str(getattr(dataset, "filename", "")), None, "PixelData",
                        f"cannot decode the pixel data (transfer syntax {name}): {reason}") from None


def load_dicom_series(folder: Path) -> tuple[np.ndarray, str | None]:
    """A DICOM series' rescaled values in RAS+, and its modality (CT, MRI, ...)."""
    series = read_dicom_series(folder)
    return series.intensities(), series.modality


def find_dicom_seg(folder: Path) -> Path | None:
    """The one DICOM-SEG object (Modality SEG) among the files of a series folder, or None."""
    pydicom = optional_module("pydicom", str(folder))
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"])
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if getattr(header, "Modality", "") == "SEG":
            found.append(path)
    if len(found) > 1:
        raise DataError(str(folder), None, None, f"{len(found)} DICOM-SEG objects ({', '.join(p.name for p in found)}): keep one per case")
    return found[0] if found else None


def _frame_group(groups, shared, keyword: str):
    """The first item of a functional group macro for one frame: its own, else the shared one."""
    for source in (groups, shared):
        if source is not None and getattr(source, keyword, None):
            return getattr(source, keyword)[0]
    return None


def load_dicom_seg(path: Path, series: DicomSeries) -> tuple[np.ndarray, dict[int, str]]:
    """The label volume (RAS+, on ``series``' grid) of a DICOM-SEG object, and segment number -> label.

    Frames are placed as ``read_dicom_seg`` places them. Where segments overlap the higher segment number
    wins, so a lesion segment drawn inside its organ's stays a label of its own (the organ's mask then
    has the lesion's hole, as in nnU-Net label maps).
    """
    names, frames = read_dicom_seg(path, series)
    rows, columns = series.slices[0].Rows, series.slices[0].Columns
    planes = [np.zeros((rows, columns), np.int32) for _ in series.slices]  # nibabel refuses int64 data
    for segment, index, mask in frames:
        planes[index][mask] = np.maximum(planes[index][mask], segment)
    return series.volume(planes, np.int32), names


def segment_volume(series: DicomSeries, frames: list[tuple[int, int, np.ndarray]], segment: int) -> np.ndarray:
    """One segment's whole mask (RAS+ bool, on ``series``' grid) from ``read_dicom_seg``'s frames."""
    first = series.slices[0]
    planes = [np.zeros((first.Rows, first.Columns), np.uint8) for _ in series.slices]
    for number, index, mask in frames:
        if number == segment:
            planes[index] |= mask.astype(np.uint8)
    return series.volume(planes, np.uint8) > 0


def read_dicom_seg(path: Path, series: DicomSeries) -> tuple[dict[int, str], list[tuple[int, int, np.ndarray]]]:
    """A DICOM-SEG object's segment number -> label, and its frames as (segment number, slice index of
    ``series``, (rows, columns) bool mask).

    Each frame belongs to the segment its SegmentIdentificationSequence names and lies on the slice at
    its PlanePositionSequence position, or, without one, on the slice its DerivationImageSequence names.
    BINARY frames are foreground where 1, FRACTIONAL ones where at least half MaximumFractionalValue.
    """
    pydicom = optional_module("pydicom", str(path))
    file = str(path)
    try:
        seg = pydicom.dcmread(file)
    except (pydicom.errors.InvalidDicomError, OSError) as error:
        raise DataError(file, None, None, f"not a readable DICOM-SEG object: {error}") from None
    for keyword in ("SegmentSequence", "PerFrameFunctionalGroupsSequence", "PixelData"):
        if keyword not in seg:
            raise DataError(file, None, keyword, "missing: not a DICOM-SEG object this reader can place")
    names = {int(segment.SegmentNumber): str(segment.SegmentLabel) for segment in seg.SegmentSequence}
    rows, columns = series.slices[0].Rows, series.slices[0].Columns
    if (seg.Rows, seg.Columns) != (rows, columns):
        raise DataError(file, None, "Rows", f"frames are {seg.Columns}x{seg.Rows} but the series' slices {columns}x{rows}")
    try:
        frames = seg.pixel_array.reshape(-1, rows, columns)  # one frame comes back 2-D
    except (ValueError, AttributeError, NotImplementedError, RuntimeError) as error:
        raise DataError(file, None, "PixelData", f"cannot decode the frames: {error}") from None
    if str(getattr(seg, "SegmentationType", "BINARY")) == "FRACTIONAL":
        foreground = frames >= float(seg.MaximumFractionalValue) / 2
    else:
        foreground = frames > 0
    per_frame = seg.PerFrameFunctionalGroupsSequence
    if len(per_frame) != len(foreground):
        raise DataError(file, None, "PerFrameFunctionalGroupsSequence", f"{len(per_frame)} items for {len(foreground)} frames")
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    uids = {str(d.SOPInstanceUID): index for index, d in enumerate(series.slices) if "SOPInstanceUID" in d}
    placed = []
    for number, (groups, mask) in enumerate(zip(per_frame, foreground), start=1):
        identification = _frame_group(groups, shared, "SegmentIdentificationSequence")
        segment = None if identification is None else int(identification.ReferencedSegmentNumber)
        if segment not in names:
            raise DataError(file, f"frame {number}", "ReferencedSegmentNumber", f"segment {segment} is not in SegmentSequence")
        plane = _frame_group(groups, shared, "PlanePositionSequence")
        derivation = _frame_group(groups, None, "DerivationImageSequence")
        if plane is not None:
            index = series.slice_at(np.array(plane.ImagePositionPatient, dtype=float))
        elif derivation is not None and "SourceImageSequence" in derivation:
            index = uids.get(str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID))
        else:
            raise DataError(file, f"frame {number}", "PlanePositionSequence", "missing, and no DerivationImageSequence either")
        if index is None:
            raise DataError(file, f"frame {number}", "PlanePositionSequence", f"the frame lies on no slice of {series.folder}")
        placed.append((segment, index, mask))
    return names, placed


def check_window(text: str) -> str:
    """``text`` as a ``--window`` value (``auto``, a named window, ``percentile`` or ``LEVEL,WIDTH`` with
    a positive width), spaces removed; ``ValueError`` naming the choices otherwise."""
    value = "".join(text.split())
    if value in WINDOWS:
        return value
    match = re.fullmatch(f"({_NUMBER}),({_NUMBER})", value)
    if match is None or not float(match.group(2)) > 0:
        raise ValueError(f"expected {'|'.join(WINDOWS)} or LEVEL,WIDTH (a positive width, e.g. 40,400), got {text!r}")
    return value


def resolve_window(window_: str, modality: str | None) -> str:
    """The window ``auto`` stands for: ``abdomen`` for CT, ``percentile`` otherwise; others as they are."""
    if window_ == "auto":
        return "abdomen" if modality == "CT" else "percentile"
    return window_


def volume_percentile_window(values: np.ndarray) -> tuple[float, float]:
    """``images.percentile_window`` of a volume, bit for bit, on one copy of ``values`` in their own type.

    numpy.percentile (linear method) converts to float64 and partitions a second copy: for an int16 CT
    that is 8 times the volume. The order statistics it interpolates are the same elements in any type,
    so they are read from a partitioned copy in the volume's type and interpolated here as numpy does
    (index (n - 1) * q, ``lo + (hi - lo) * t`` below t = 0.5, ``hi - (hi - lo) * (1 - t)`` from it; NaN
    anywhere gives NaN). tests/data/test_volume_inputs.py checks the equality on random volumes."""
    flat = values.flatten(order="K")  # one copy, in memory order (the order of the elements is no matter)
    last = flat.size - 1
    virtual = [last * (np.float64(q) / 100) for q in WINDOW_PERCENTILES]
    below = [int(np.floor(v)) if v < last else last for v in virtual]
    above = [min(b + 1, last) for b in below]
    flat.partition(sorted({*below, *above, last}))
    if flat.dtype.kind in "fc" and np.isnan(flat[last]):
        return float("nan"), float("nan")
    low, high = (
        float(hi - (hi - lo) * (1 - t)) if t >= 0.5 else float(lo + (hi - lo) * t)
        for lo, hi, t in ((np.float64(flat[b]), np.float64(flat[a]), np.float64(v - b) if v < last else np.float64(0))
                          for v, b, a in zip(virtual, below, above))
    )
    return low, max(high - low, 0.0)


def window_bounds(values: np.ndarray, window_: str) -> tuple[float, float]:
    """(low, width) of a resolved ``--window`` value (see ``check_window``): a named CT window or a
    ``LEVEL,WIDTH`` (level/width in the volume's units, HU for CT), or 0.5-99.5 percentiles of ``values``."""
    if window_ == "percentile":
        return volume_percentile_window(values)
    if window_ in CT_WINDOWS:
        level, width = CT_WINDOWS[window_]
    else:
        level, width = (float(part) for part in check_window(window_).split(","))
    return level - width / 2, width


def map_intensities(values: np.ndarray, mapping: str) -> np.ndarray:
    """uint8 display values of a resolved ``--window`` value (``window_bounds``, ``apply_window``)."""
    return apply_window(values, *window_bounds(values, mapping))


def display_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """Slice ``index`` of a RAS+ volume along ``axis``, flipped and transposed for radiological display."""
    if axis == "axial":
        plane = volume[:, :, index]  # (x: towards patient right, y: towards anterior)
        return plane[::-1, ::-1].T
    if axis == "coronal":
        plane = volume[:, index, :]  # (x, z: towards superior)
        return plane[::-1, ::-1].T
    plane = volume[index, :, :]  # (y, z)
    return plane[::-1, ::-1].T


def undo_display(shown: np.ndarray) -> np.ndarray:
    """The plane of a volume slice that ``display_slice`` shows as ``shown`` (any axis): a view."""
    return shown.T[::-1, ::-1]


def choose_slices(labels: np.ndarray, axis: str, rule: SliceRule, names: dict[int, str], file: str = "") -> list[int]:
    """Indices along ``axis`` selected by ``rule`` (sorted, unique); ``file`` names the volume in the
    ``DataError`` of a slice range outside it."""
    moved = np.moveaxis(labels, AXES[axis], 0)
    flat = moved.reshape(moved.shape[0], -1)
    values = [value for value in sorted(names) if value != 0]
    areas = np.stack([(flat == value).sum(axis=1) for value in values], axis=1) if values else np.zeros((len(flat), 0))
    if rule.rule == "largest":
        wanted = [i for i, value in enumerate(values) if rule.label in (None, names[value])]
        chosen = {int(np.argmax(areas[:, i])) for i in wanted if areas[:, i].max() > 0}
        return sorted(chosen)
    present = (areas > 0).sum(axis=1)
    return [index for index in rule.indices(len(flat), file, axis) if present[index] >= rule.min_labels]
