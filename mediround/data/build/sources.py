"""Labelled segmentation sources as cases of labelled 2-D images.

A ``Case`` is what splits keep together (a patient, a scan): every image of a case lands in one split.
Kinds: ``sa-med2d`` (image2label/label2image maps, masks ``<stem>_<class>_<instance>.png``),
``biomedparse`` (``<images>/`` beside ``<images>_mask/``, masks ``<stem>_<class+words>.png``),
``nnunet`` (``dataset.json``, ``imagesTr/``, ``labelsTr/``) and ``dicom`` (one folder per case holding a
DICOM series and its labels: ``labels.nii.gz`` on the same grid, named by ``dataset.json``, or else a
DICOM-SEG object among the slices, named by its segment labels).

A bad 2-D image or mask skips that image, a bad volume or label volume skips its case: ``load_images``
returns the problems beside the images it could read.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from mediround.data.build.relations import Structure, display_name
from mediround.data.build.volumes import (
    SliceRule,
    check_window,
    choose_slices,
    display_slice,
    find_dicom_seg,
    load_dicom_seg,
    load_nifti,
    map_intensities,
    optional_module,
    read_dicom_series,
    resolve_window,
)
from mediround.data.formats.samed2d import class_from_mask_name, image_masks, modality_from_name
from mediround.data.images import image_size, load_mask
from mediround.errors import DataError

KINDS = ("sa-med2d", "biomedparse", "nnunet", "dicom")
MIN_PIXELS = 16
"""Smaller masks (a label grazing a slice) are not structures a round could ask for."""
NIFTI_ENDINGS = (".nii.gz", ".nii")
MR_WORDS = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")


@dataclass(frozen=True)
class Case:
    """One patient/scan. ``images`` (2-D kinds): (image path, ((mask path, label), ...)) per image;
    ``volume`` (3-D kinds): the image volume (file or DICOM folder) and the label volume."""

    id: str
    kind: str
    images: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    volume: tuple[str, str] | None = None
    modality: str | None = None


@dataclass(frozen=True)
class SliceOptions:
    """How volumes become images: axis, slice rule, intensity mapping (a ``--window`` value: "auto" is the
    abdomen window for CT, percentile scaling otherwise; see ``volumes.check_window``)."""

    axis: str = "axial"
    rule: SliceRule = field(default_factory=SliceRule)
    intensities: str = "auto"


@dataclass
class LabelledImage:
    """One 2-D image and its structures. ``pixels`` for slices cut from volumes, ``file`` for 2-D
    images copied as they are; ``view`` is the slice axis (None for 2-D images)."""

    id: str
    case: str
    structures: list[Structure]
    modality: str | None
    pixels: np.ndarray | None = None
    file: str | None = None
    view: str | None = None


def detect_kind(source: Path) -> str:
    """The kind of a source folder, from its layout."""
    if not source.is_dir():
        raise DataError(str(source), None, None, "not a folder: give a labelled dataset folder")
    if (source / "dataset.json").is_file():
        return "nnunet" if (source / "labelsTr").is_dir() else "dicom"
    if any(source.glob("image2label*.json")) or any(source.glob("*/image2label*.json")) or any(
        source.glob("label2image*.json")
    ) or any(source.glob("*/label2image*.json")):
        return "sa-med2d"
    if any(path.is_dir() for path in source.glob("*_mask")):
        return "biomedparse"
    raise DataError(
        str(source), None, None, f"cannot tell the source kind from the layout; give --from {'|'.join(KINDS)}"
    )


def list_cases(source: Path, kind: str) -> list[Case]:
    """Every case of a source, sorted by id (the order shards and outputs follow)."""
    finders = {"sa-med2d": _samed2d_cases, "biomedparse": _biomedparse_cases, "nnunet": _nnunet_cases,
               "dicom": _dicom_cases}
    cases = finders[kind](source)
    return sorted(cases, key=lambda case: case.id)


def _group(kind: str, by_case: dict[str, list], modality: dict[str, str | None]) -> list[Case]:
    return [
        Case(case, kind, tuple(sorted(images)), modality=modality[case]) for case, images in by_case.items()
    ]


def samed2d_case(stem: str) -> str:
    """The scan an SA-Med2D slice belongs to: ``ct_00--X--Case_00011--x_0040`` -> ``ct_00--X--Case_00011``,
    ``amos_0004_75`` -> ``amos_0004``."""
    if "--" in stem:
        return stem.rsplit("--", 1)[0]
    return re.sub(r"_\d+$", "", stem)


def _samed2d_cases(source: Path) -> list[Case]:
    by_case: dict[str, list] = {}
    modality: dict[str, str | None] = {}
    for map_path, root, image, masks in image_masks(source):
        stem = PurePosixPath(image).stem
        labelled = []
        for mask in masks:
            label = class_from_mask_name(PurePosixPath(mask).stem, stem)
            if label is None:
                raise DataError(
                    str(map_path), f"mask {mask}", "mask", "no class name (expected <image stem>_<class>_<instance>.png)"
                )
            labelled.append((str(root / mask), label))
        case = samed2d_case(stem)
        by_case.setdefault(case, []).append((str(root / image), tuple(labelled)))
        modality[case] = modality_from_name(stem)
    return _group("sa-med2d", by_case, modality)


def biomedparse_modality(stem: str) -> str | None:
    """``06_CT_abdomen`` -> CT, ``09_MRI-FLAIR_brain`` -> MRI, ``15_X-Ray_chest`` -> X-ray."""
    parts = stem.split("_")
    if len(parts) < 3:
        return None
    token = parts[-2]
    if token.upper().startswith("MRI"):
        return "MRI"
    return {"x-ray": "X-ray", "ct": "CT"}.get(token.lower(), token)


def biomedparse_case(stem: str) -> str:
    """The scan a BiomedParse image belongs to: the name before ``_<modality>_<site>`` without a trailing
    slice number (``ACDC_patient001_frame01_1_MRI_heart`` -> ``ACDC_patient001_frame01``)."""
    parts = stem.split("_")
    prefix = "_".join(parts[:-2]) if len(parts) >= 3 else stem
    return re.sub(r"(?<=.)_\d+$", "", prefix) or stem


def _biomedparse_cases(source: Path) -> list[Case]:
    by_case: dict[str, list] = {}
    modality: dict[str, str | None] = {}
    for mask_folder in sorted(path for path in source.glob("*_mask") if path.is_dir()):
        image_folder = source / mask_folder.name[: -len("_mask")]
        stems = sorted((path.stem for path in image_folder.glob("*.png")), key=len, reverse=True)
        masks: dict[str, list] = {stem: [] for stem in stems}
        for mask in sorted(mask_folder.glob("*.png")):
            owner = next((stem for stem in stems if mask.stem.startswith(stem + "_")), None)
            if owner is None:
                raise DataError(str(mask), None, None, f"no image in {image_folder} whose name this mask extends")
            masks[owner].append((str(mask), mask.stem[len(owner) + 1 :]))
        for stem, labelled in masks.items():
            case = biomedparse_case(stem)
            by_case.setdefault(case, []).append((str(image_folder / f"{stem}.png"), tuple(labelled)))
            modality[case] = biomedparse_modality(stem)
    return _group("biomedparse", by_case, modality)


def read_labels(dataset_json: Path) -> tuple[dict[int, str], dict]:
    """Label value -> name from an nnU-Net ``dataset.json`` (v2 ``{"liver": 1}`` or v1 ``{"1": "liver"}``)."""
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(str(dataset_json), None, None, f"cannot read: {error}") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise DataError(str(dataset_json), None, "labels", "missing or empty (label value -> name)")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):
            names[value] = key
        elif isinstance(value, str) and key.isdigit():
            names[int(key)] = value
        else:
            raise DataError(str(dataset_json), f"label {key}", "labels", "expected name: integer (region lists are not supported)")
    return {value: name for value, name in names.items() if value != 0}, meta


def modality_from_channel(name: str) -> str:
    """nnU-Net channel names: "CT" -> CT; T1/T2/FLAIR/ADC/MRI... -> MRI; anything else as written."""
    if name.upper() == "CT":
        return "CT"
    return "MRI" if any(word in name.upper() for word in MR_WORDS) else name


def channel_modality(meta: dict, channel: str = "0") -> str:
    """The modality of one channel of an nnU-Net ``dataset.json`` (CT when it names no channels)."""
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    return modality_from_channel(str(channels.get(channel, next(iter(channels.values())))))


def nifti_modality(path: Path) -> str | None:
    """The modality of a NIfTI image file as ``build-dialogues`` reads it when the file is an nnU-Net
    image (``<case>_<channel>.nii.gz`` in a folder beside ``dataset.json``); None for any other file."""
    stem = next((path.name[: -len(ending)] for ending in NIFTI_ENDINGS if path.name.endswith(ending)), path.name)
    match = re.fullmatch(r".+_(\d{4})", stem)
    meta_path = path.parent.parent / "dataset.json"
    if match is None or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return channel_modality(meta, str(int(match.group(1)))) if isinstance(meta, dict) else None


def _nnunet_cases(source: Path) -> list[Case]:
    optional_module("nibabel", str(source))  # a missing extra stops the build, it is not a bad case
    _, meta = read_labels(source / "dataset.json")
    modality = channel_modality(meta)
    ending = meta.get("file_ending", ".nii.gz")
    cases = []
    for label in sorted((source / "labelsTr").glob(f"*{ending}")):
        case = label.name[: -len(ending)]
        image = source / "imagesTr" / f"{case}_0000{ending}"
        if not image.is_file():
            raise DataError(str(label), None, None, f"no image {image.name} in imagesTr for this case")
        cases.append(Case(case, "nnunet", volume=(str(image), str(label)), modality=modality))
    if not cases:
        raise DataError(str(source / "labelsTr"), None, None, f"no label volumes (*{ending})")
    return cases


def _dicom_cases(source: Path) -> list[Case]:
    optional_module("pydicom", str(source))  # a missing extra stops the build, it is not a bad case
    optional_module("nibabel", str(source))
    cases = []
    for folder in sorted(path for path in source.iterdir() if path.is_dir()):
        labels = next((folder / f"labels{ending}" for ending in NIFTI_ENDINGS if (folder / f"labels{ending}").is_file()), None)
        if labels is None:
            labels = find_dicom_seg(folder)
        if labels is None:
            raise DataError(str(folder), None, None, "no labels.nii.gz and no DICOM-SEG object beside the DICOM series")
        if labels.name.endswith(NIFTI_ENDINGS):
            read_labels(source / "dataset.json")
        cases.append(Case(folder.name, "dicom", volume=(str(folder), str(labels))))
    if not cases:
        raise DataError(str(source), None, None, "no case folders (one DICOM series + labels.nii.gz or a DICOM-SEG each)")
    return cases


def structures_of(masks: list[tuple[str, np.ndarray]]) -> list[Structure]:
    """Structures of the masks large enough to ask for, display-named."""
    return [Structure(display_name(label), mask) for label, mask in masks if int(mask.sum()) >= MIN_PIXELS]


@contextlib.contextmanager
def reading(item: str, field: str) -> Iterator[None]:
    """Name the build item (case, image) and the field in a problem raised by a reader that knows only
    the file."""
    try:
        yield
    except DataError as problem:
        raise DataError(problem.file, problem.item or item, problem.field or field, problem.reason) from None


def load_images(case: Case, source: Path, options: SliceOptions) -> tuple[list[LabelledImage], list[DataError]]:
    """The labelled images of one case (2-D images as they are, volumes sliced by ``options``) and the
    problems of what could not be read: a bad image or mask skips its image, a bad volume the case."""
    images, problems = [], []
    if case.volume is None:
        for image, labelled in case.images:
            try:
                images.append(_flat_image(case, image, labelled))
            except DataError as problem:
                problems.append(problem)
        return images, problems
    try:
        images = _slices(case, source, options)
    except DataError as problem:
        problems.append(problem)
    return images, problems


def _flat_image(case: Case, image: str, labelled: tuple[tuple[str, str], ...]) -> LabelledImage:
    item = f"case {case.id}: image {Path(image).name}"
    with reading(item, "image"):
        width, height = image_size(image)
    masks = []
    for path, label in labelled:
        with reading(item, "mask"):
            mask = load_mask(path)
        if mask.shape != (height, width):
            raise DataError(path, item, "mask", f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
        masks.append((label, mask))
    return LabelledImage(Path(image).stem, case.id, structures_of(masks), case.modality, file=image)


def _slices(case: Case, source: Path, options: SliceOptions) -> list[LabelledImage]:
    image_path, label_path = case.volume
    item = f"case {case.id}"
    if case.kind == "dicom":
        with reading(item, "image"):
            series = read_dicom_series(Path(image_path))
            intensities, modality = series.intensities(), series.modality
    else:
        with reading(item, "image"):
            intensities = load_nifti(Path(image_path))
        modality = case.modality
    with reading(item, "labels"):
        if label_path.endswith(NIFTI_ENDINGS):
            names, _ = read_labels(source / "dataset.json")
            labels = np.rint(load_nifti(Path(label_path))).astype(np.int64)
        else:
            labels, names = load_dicom_seg(Path(label_path), series)
    if labels.shape != intensities.shape:
        raise DataError(label_path, item, "labels", f"label volume is {labels.shape} but the image volume is {intensities.shape}")
    try:
        mapping = resolve_window(check_window(options.intensities), modality)
    except ValueError as error:
        raise DataError(image_path, item, "window", str(error)) from None
    display = map_intensities(intensities, mapping)
    images = []
    with reading(item, "slices"):
        chosen = choose_slices(labels, options.axis, options.rule, names, image_path)
    for index in chosen:
        plane = display_slice(labels, options.axis, index)
        masks = [(names[value], plane == value) for value in sorted(names)]
        images.append(
            LabelledImage(
                f"{case.id}_{options.axis}_{index:04d}",
                case.id,
                structures_of(masks),
                modality,
                pixels=np.ascontiguousarray(display_slice(display, options.axis, index)),
                view=options.axis,
            )
        )
    return images
