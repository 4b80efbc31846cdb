"""The files ``mediround chat VOLUME`` writes for one scan (see docs/formats.md, "Volumes in, volumes out").

NIfTI input: ``<case>_labels.nii.gz``, a uint8 label volume on the input's grid (its shape, affine,
qform/sform codes and units; intent NIFTI_INTENT_LABEL), round r's voxels holding r, the later round's
label where rounds overlap; with ``per_round`` one 0/1 ``<case>_round-<r>.nii.gz`` per round, the
round's whole mask. DICOM input: ``<case>_seg.dcm``, a BINARY DICOM-SEG object (highdicom) that
references every source slice (its SOP Instance UID), one segment per round (overlaps kept), and carries
the source's patient and study modules, as the standard requires. Both: the sidecar (the main file's
name with ``.json``) naming each label or segment with its question, the per-round summary (voxels, ml,
slices with a mask), the window and slices used, and the model settings. No header value of a DICOM
series reaches any file but the DICOM-SEG object. Every file is written under a temporary name and
renamed.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mediround import __version__
from mediround.atomic import atomic_open, atomic_path, write_json
from mediround.data.build.volumes import optional_module
from mediround.errors import DataError

if TYPE_CHECKING:
    from mediround.data.scans import RoundMasks, Scan, ScanOptions, ScanResult

SIDECAR_FORMAT = "mediround-scan-labels/1"
"""The sidecar's ``format``: how ``eval`` recognises a ``chat VOLUME`` output."""
SEGMENT_LABEL_LENGTH = 64
"""SegmentLabel is a DICOM LO: 64 characters at most (the whole question is in SegmentDescription)."""
REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
"""Type 1 attributes of the source the DICOM-SEG object needs."""
EMPTY_ALLOWED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
"""Type 2 attributes of the patient and study modules the DICOM-SEG copies: empty when the source lacks them."""
OVERLAP = "where rounds overlap, the label volume holds the later round's label; each round's whole mask is in its --per-round file"


def write_outputs(result: ScanResult, masks: RoundMasks, out: Path, options: ScanOptions) -> dict:
    """Write ``result``'s files into ``out``; returns them by kind (``labels``, ``rounds``, ``seg``,
    ``sidecar``), as names inside ``out``."""
    scan = result.scan
    out.mkdir(parents=True, exist_ok=True)
    if scan.kind == "nifti":
        files: dict = {"labels": f"{scan.case}_labels.nii.gz"}
        labels, shown = masks.label_volume()
        for summary in result.rounds:
            summary.voxels_in_label_volume = shown[summary.round - 1]
        write_nifti(out / files["labels"], scan.to_native(labels), scan, len(result.rounds))
        del labels
        if options.per_round:
            files["rounds"] = {}
            for summary in result.rounds:
                name = files["rounds"][str(summary.round)] = f"{scan.case}_round-{summary.round}.nii.gz"
                write_nifti(out / name, scan.to_native(masks.round_mask(summary.round)), scan, 1)
        files["sidecar"] = f"{scan.case}_labels.json"
    else:
        files = {"seg": f"{scan.case}_seg.dcm", "sidecar": f"{scan.case}_seg.json"}
        write_dicom_seg(out / files["seg"], result, masks)
    write_json(out / files["sidecar"], sidecar(result, options, files))
    return files


def sidecar(result: ScanResult, options: ScanOptions, files: dict) -> dict:
    """The sidecar's content (no path, no header value: only the case id names the scan)."""
    scan = result.scan
    rule, span = options.slices
    asked = rule if span is None else f"{'' if span[0] is None else span[0]}:{'' if span[1] is None else span[1]}"
    return {
        "format": SIDECAR_FORMAT,
        "case": scan.case,
        "kind": scan.kind,
        "shape": list(scan.native_shape),
        "voxel_ml": scan.voxel_ml,
        "window": {"asked": options.window, "used": result.window},
        "slices": {"asked": asked, "axis": "axial", "run": result.slices},
        "model": options.model,
        "files": {kind: name for kind, name in files.items() if kind != "sidecar"},
        "overlap": OVERLAP if scan.kind == "nifti" else "segments may overlap: each holds its round's whole mask",
        "labels": [summary.as_dict() for summary in result.rounds],
        "mediround_version": __version__,
    }


def write_nifti(path: Path, data: np.ndarray, scan: Scan, maximum: int) -> None:
    """``data`` (native grid) as a uint8 NIfTI on the scan's grid: its geometry copied from the source
    header (zooms, units, qform and sform with their codes), nothing else (no free-text field)."""
    nibabel = optional_module("nibabel", str(path))
    source = scan.header
    header = nibabel.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.uint8)
    header.set_zooms(source.get_zooms()[:3])
    header.set_xyzt_units(*source.get_xyzt_units())
    for setter, (affine, code) in ((header.set_qform, source.get_qform(coded=True)),
                                   (header.set_sform, source.get_sform(coded=True))):
        setter(affine, int(code))
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, maximum
    image = nibabel.Nifti1Image(np.asarray(data, dtype=np.uint8), None, header)
    with atomic_open(path, "wb") as handle, gzip.GzipFile(fileobj=handle, mode="wb", mtime=0) as stream:
        image.to_file_map(nibabel.Nifti1Image.make_file_map({"image": stream}))


def write_dicom_seg(path: Path, result: ScanResult, masks: RoundMasks) -> None:
    """A BINARY DICOM-SEG over the scan's series: one frame per source slice and segment (empty frames
    left out), one segment per round, labelled with the round and its question."""
    highdicom = optional_module("highdicom", str(path))
    codes = optional_module("pydicom.sr.codedict", str(path)).codes
    scan = result.scan
    series = scan.series
    columns, rows, count = scan.native_shape
    frames = np.zeros((count, rows, columns, len(result.rounds)), bool)
    for summary in result.rounds:
        # native voxels are (column, row, slice); a frame is (row, column)
        frames[..., summary.round - 1] = scan.to_native(masks.round_mask(summary.round)).transpose(2, 1, 0)
    structure = highdicom.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
    algorithm = highdicom.AlgorithmIdentificationSequence(name="MediRound", version=__version__,
                                                          family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for summary in result.rounds:
        description = highdicom.seg.SegmentDescription(
            segment_number=summary.round,
            segment_label=f"round {summary.round}: {summary.question}"[:SEGMENT_LABEL_LENGTH],
            segmented_property_category=structure, segmented_property_type=structure,
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        description.SegmentDescription = summary.question[:1024]
        descriptions.append(description)
    first = series.slices[0]
    for keyword in REFERENCED:
        if not getattr(first, keyword, None):
            raise DataError(str(series.folder), None, keyword, "missing: the DICOM-SEG object must reference it")
    for keyword in EMPTY_ALLOWED:
        if keyword not in first:  # type 2: present, empty when unknown (headers in memory only)
            setattr(first, keyword, "")
    seg = highdicom.seg.Segmentation(
        source_images=series.slices, pixel_array=frames,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(), series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=highdicom.UID(), instance_number=1, manufacturer="MediRound",
        manufacturer_model_name="MediRound", software_versions=__version__, device_serial_number="none",
        series_description="MediRound multi-round segmentation", content_label="MEDIROUND",
        omit_empty_frames=bool(frames.any()),  # with no mask anywhere every frame stays (and no warning)
        content_description=f"{len(result.rounds)} rounds of one dialogue on every selected axial slice")
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
