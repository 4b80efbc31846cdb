"""Scans in, label volumes out (``mediround.data.scans``) with a stub segmenter that marks bright pixels:
the outputs lie on the input's grid, and a voxel the stub marks lands at the input voxel's world
coordinates (checked through the affines and DICOM plane positions, never by index)."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom
import nibabel
import numpy as np
import pydicom
import pytest
from volume_files import PATIENT, oblique_affine, write_dicom_series

from mediround.data.dialogue import Round
from mediround.data.scans import RoundMasks, ScanOptions, read_scan, run_scan
from mediround.errors import DataError

QUESTIONS = [Round("Segment the bright structure."), Round("Segment what is brighter than the background.", ref=1)]
WINDOW = "500,1000"
"""Display 0 at 0 and 255 at 1000: the bright blob (1000) shows at 255, the dim one (400) at 102."""


def stub_segmenter(seen: list[int]):
    """Round 1: pixels above 200 (the bright blob); round 2: above 50 (both blobs, over round 1's)."""

    def segment(indices, image_of):
        for index in indices:
            seen.append(index)
            grey = image_of(index)[..., 0]
            yield index, [grey > 200, grey > 50]

    return segment


def world(affine: np.ndarray, voxels: np.ndarray) -> set[tuple[float, ...]]:
    """World coordinates (mm, rounded to 1e-3) of voxel indices (N, 3) through ``affine``."""
    points = nibabel.affines.apply_affine(affine, voxels)
    return {tuple(np.round(point, 3)) for point in points}


def nifti_scan(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 20x12x16 int16 volume on ``oblique_affine()``: a bright blob and a dim one at known voxels."""
    data = np.zeros((20, 12, 16), np.int16)
    data[3:6, 4:7, 9:11] = 1000
    data[12:15, 2:4, 3:5] = 400
    affine = oblique_affine()
    nibabel.save(nibabel.Nifti1Image(data, affine), path)
    return data, affine, np.argwhere(data == 1000)


def test_nifti_labels_lie_on_the_input_grid_at_the_same_world_coordinates(tmp_path: Path) -> None:
    data, affine, bright = nifti_scan(tmp_path / "scan.nii.gz")
    seen: list[int] = []
    scan = read_scan(tmp_path / "scan.nii.gz")
    assert scan.case == "scan" and scan.intensities.shape == (20, 16, 12)  # LIA -> RAS+: axes swapped
    result = run_scan(scan, QUESTIONS, stub_segmenter(seen), tmp_path / "out", ScanOptions(window=WINDOW, per_round=True))
    assert seen == list(range(12))  # every axial slice of the RAS+ grid
    labels = nibabel.load(tmp_path / "out" / "scan_labels.nii.gz")
    assert labels.shape == data.shape and np.allclose(labels.affine, affine, atol=1e-5)
    assert labels.get_data_dtype() == np.uint8 and labels.header.get_intent()[0] == "label"
    values = np.asarray(labels.dataobj)
    assert world(labels.affine, np.argwhere(values == 2)) == world(affine, np.argwhere(data > 0))
    assert not (values == 1).any()  # round 2 covers round 1: the later label wins
    round_1 = nibabel.load(tmp_path / "out" / "scan_round-1.nii.gz")
    assert np.allclose(round_1.affine, affine, atol=1e-5)
    assert world(round_1.affine, np.argwhere(np.asarray(round_1.dataobj) == 1)) == world(affine, bright)
    sidecar = json.loads((tmp_path / "out" / "scan_labels.json").read_text())
    assert sidecar["window"] == {"asked": WINDOW, "used": WINDOW} and sidecar["slices"]["run"] == list(range(12))
    first, second = sidecar["labels"]
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert (first["label"], first["question"], first["refers_to"]) == (1, QUESTIONS[0].query, None)
    assert first["voxels"] == len(bright) == 18 and first["voxels_in_label_volume"] == 0
    assert first["ml"] == pytest.approx(18 * voxel_ml, abs=1e-4)
    assert second["voxels"] == second["voxels_in_label_volume"] == 30 and second["refers_to"] == 1
    # the blobs' native k (voxel axis 2, anterior) is RAS+ axis 1; native j (inferior) is the axial axis
    assert first["slices_with_mask"] == [12 - 1 - j for j in (6, 5, 4)] == result.rounds[0].slices_with_mask
    assert sidecar["files"] == {"labels": "scan_labels.nii.gz", "rounds": {"1": "scan_round-1.nii.gz",
                                                                          "2": "scan_round-2.nii.gz"}}


def test_slice_ranges_and_largest_keep_their_slices(tmp_path: Path) -> None:
    nifti_scan(tmp_path / "scan.nii.gz")
    seen: list[int] = []
    ranged = run_scan(read_scan(tmp_path / "scan.nii.gz", "case-7"), QUESTIONS, stub_segmenter(seen), tmp_path / "a",
                      ScanOptions(slices=("every", (6, 12)), window=WINDOW))
    assert seen == list(range(6, 12)) and ranged.rounds[0].slices_with_mask == [6, 7] and ranged.rounds[1].voxels == 12 + 12
    assert (tmp_path / "a" / "case-7_labels.nii.gz").exists()
    largest = run_scan(read_scan(tmp_path / "scan.nii.gz"), QUESTIONS, stub_segmenter([]), tmp_path / "b",
                       ScanOptions(slices=("largest", None), window=WINDOW))
    assert [r.slices_with_mask for r in largest.rounds] == [[5], [5]] and largest.rounds[0].voxels == 6
    with pytest.raises(DataError, match=r"slice range 6:13 lies outside the volume's 12 axial slices \(0:12\)"):
        run_scan(read_scan(tmp_path / "scan.nii.gz"), QUESTIONS, stub_segmenter([]), tmp_path / "c",
                 ScanOptions(slices=("every", (6, 13))))


def test_round_masks_hold_overlapping_rounds_in_one_bit_volume() -> None:
    masks = RoundMasks((4, 3, 2), 9)
    assert masks.bits.dtype == np.uint16
    shown = np.zeros((3, 4), bool)  # an axial slice is shown (y, x) flipped
    shown[0, 0] = True
    masks.put(1, [shown] * 9)
    labels, counts = masks.label_volume()
    assert masks.round_mask(9)[3, 2, 1] and masks.round_mask(9).sum() == 1 and labels[3, 2, 1] == 9
    assert counts == [0] * 8 + [1]
    with pytest.raises(ValueError, match="for a slice shown as"):
        masks.put(0, [shown.T] * 9)


def test_bad_scans_and_questions_are_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a NIfTI file"):
        read_scan(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="not found"):
        read_scan(tmp_path / "missing.nii.gz")
    nifti_scan(tmp_path / "scan.nii")
    with pytest.raises(DataError, match="names the output files"):
        read_scan(tmp_path / "scan.nii", "../up")
    scan = read_scan(tmp_path / "scan.nii")
    with pytest.raises(DataError, match="question 2: .*refers to round 2, which is not an earlier round"):
        run_scan(scan, [Round("a"), Round("b", ref=2)], stub_segmenter([]), tmp_path / "out")


def coronal_series(folder: Path) -> tuple[list[Path], np.ndarray]:
    """A CT series acquired coronally (rows run inferior, slices posterior), 0.7 x 0.9 mm pixels, slices
    2.5 mm apart, patient data set; a bright blob at known (slice, row, column)."""
    stored = np.zeros((6, 10, 14), np.uint16)  # (slice, row, column)
    stored[2:4, 3:5, 5:9] = 1000
    files = write_dicom_series(folder, list(stored), orientation=(1, 0, 0, 0, 0, -1), pixel_spacing=(0.7, 0.9),
                               step=2.5, origin=(-20.0, 10.0, 35.0), patient=PATIENT)
    return files, np.argwhere(stored == 1000)


def dicom_world(position, orientation, spacing, pixels: np.ndarray) -> set[tuple[float, ...]]:
    """LPS world coordinates of (row, column) pixels of a plane at ``position``."""
    cosines = np.array(orientation, dtype=float)
    row_spacing, column_spacing = (float(v) for v in spacing)
    points = (np.array(position, dtype=float) + pixels[:, 1:2] * column_spacing * cosines[:3]
              + pixels[:, 0:1] * row_spacing * cosines[3:])
    return {tuple(np.round(point, 3)) for point in points}


def test_dicom_seg_references_the_series_and_lands_at_the_same_world_coordinates(tmp_path: Path) -> None:
    files, bright = coronal_series(tmp_path / "series")
    scan = read_scan(tmp_path / "series")
    assert scan.case.startswith("series-") and len(scan.case) == len("series-") + 12
    result = run_scan(scan, QUESTIONS, stub_segmenter([]), tmp_path / "out", ScanOptions(window=WINDOW))
    assert result.files == {"seg": f"{scan.case}_seg.dcm", "sidecar": f"{scan.case}_seg.json"}
    seg = highdicom.seg.segread(tmp_path / "out" / result.files["seg"])
    sources = [pydicom.dcmread(f) for f in files]
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {d.SOPInstanceUID for d in sources}
    assert seg.PatientName == PATIENT["PatientName"] and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.get_segment_numbers() == [1, 2]
    assert seg.get_segment_description(2).SegmentDescription == QUESTIONS[1].query
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    marked = set()
    for frame, groups in zip(seg.pixel_array.reshape(-1, 10, 14), seg.PerFrameFunctionalGroupsSequence):
        if groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1:
            position = groups.PlanePositionSequence[0].ImagePositionPatient
            marked |= dicom_world(position, orientation, spacing, np.argwhere(frame))
    expected = set()
    for index in np.unique(bright[:, 0]):
        expected |= dicom_world(sources[index].ImagePositionPatient, sources[index].ImageOrientationPatient,
                                sources[index].PixelSpacing, bright[bright[:, 0] == index][:, 1:])
    assert marked == expected and len(expected) == 16
    sidecar = json.loads((tmp_path / "out" / result.files["sidecar"]).read_text())
    assert sidecar["labels"][0]["voxels"] == 16 and sidecar["labels"][0]["voxels_in_label_volume"] is None
