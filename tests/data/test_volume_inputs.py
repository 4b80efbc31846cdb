"""What ``build-dialogues`` and ``chat VOLUME`` read alike: ``--window`` and ``--slices`` values, 4-D files,
DICOM series that are not one volume or cannot be decoded, and patient data kept out of what is written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.encaps import encapsulate
from volume_files import LABELS, PATIENT, write_dicom_series, write_nnunet

from mediround.data.build.volumes import (
    check_window,
    map_intensities,
    parse_slices,
    read_dicom_series,
    read_nifti,
    volume_percentile_window,
)
from mediround.data.images import WINDOW_PERCENTILES, window
from mediround.errors import DataError
from mediround_cli.common import SKIPPED_EXIT_CODE
from mediround_cli.main import cli

MPEG2 = "1.2.840.10008.1.2.4.100"


def run(*args: object):
    return CliRunner().invoke(cli, [*map(str, args)])


def built_ids(out: Path) -> list[str]:
    return sorted(json.loads(line)["id"] for file in out.glob("*.jsonl") if file.name != "errors.jsonl"
                  for line in file.read_text().splitlines())


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_window_values_named_or_numeric_map_alike_and_bad_ones_are_refused(tmp_path: Path) -> None:
    values = np.array([-1000.0, -160.0, 40.0, 239.0, 3000.0])
    assert check_window(" 40, 400 ") == "40,400" and check_window("lung") == "lung"
    assert map_intensities(values, "40,400").tolist() == map_intensities(values, "abdomen").tolist() == [0, 0, 128, 254, 255]
    assert map_intensities(values, "-6e2,1.5e3").tolist() == map_intensities(values, "lung").tolist()
    for bad in ("40", "40,0", "40,-5", "soft", "a,b"):
        with pytest.raises(ValueError, match="LEVEL,WIDTH"):
            check_window(bad)
    result = run("build-dialogues", write_nnunet(tmp_path / "src", cases=1), tmp_path / "out", "--window", "40,0")
    assert result.exit_code == 2 and "Invalid value for '--window'" in result.output and "positive width" in result.output


def test_volume_percentiles_equal_numpy_percentile_on_a_float64_copy() -> None:
    rng = np.random.default_rng(1)
    volumes = [rng.integers(-1024, 3000, (7, 9, 5)).astype(np.int16), rng.normal(0, 300, (40, 3, 2)),
               rng.gamma(2.0, 50.0, (13, 11, 3)).astype(np.float32), rng.integers(0, 4095, (1, 1, 3)).astype(np.uint16),
               np.full((4, 4, 4), 7, np.int16)]
    for values in volumes:
        low, high = np.percentile(values.astype(np.float64), WINDOW_PERCENTILES)
        assert volume_percentile_window(values) == (low, max(high - low, 0.0))
        assert np.array_equal(map_intensities(values, "percentile"), window(values))
    with_nan = rng.normal(0, 1, (5, 5, 5))
    with_nan[2, 2, 2] = np.nan
    assert all(np.isnan(volume_percentile_window(with_nan)))


def test_slice_ranges_join_every_and_a_range_outside_the_volume_skips_its_case(tmp_path: Path) -> None:
    assert parse_slices("every") == ("every", None) and parse_slices("largest") == ("largest", None)
    assert parse_slices("2:4") == ("every", (2, 4)) and parse_slices(":3") == ("every", (None, 3))
    for bad in ("4:2", "3", "a:b", "2:4:1"):
        with pytest.raises(ValueError):
            parse_slices(bad)
    source = write_nnunet(tmp_path / "src", cases=1)  # 6 axial slices; 1..4 show all three labels
    result = run("build-dialogues", source, tmp_path / "out", "--slices", "3:6", "--min-labels", "3")
    assert result.exit_code == 0, result.output
    assert built_ids(tmp_path / "out") == ["case_000_axial_0003", "case_000_axial_0004"]
    outside = run("build-dialogues", source, tmp_path / "outside", "--slices", "3:9")
    assert outside.exit_code == SKIPPED_EXIT_CODE, outside.output
    (error,) = errors(tmp_path / "outside")
    assert (error["item"], error["field"]) == ("case case_000", "slices")
    assert error["reason"] == "slice range 3:9 lies outside the volume's 6 axial slices (0:6)"


def test_a_4d_file_of_several_volumes_is_refused_and_of_one_volume_read(tmp_path: Path) -> None:
    source = write_nnunet(tmp_path / "src", cases=2)
    for case, volumes in (("case_000", 1), ("case_001", 3)):
        path = source / "imagesTr" / f"{case}_0000.nii.gz"
        image = nibabel.load(path)
        data = np.repeat(np.asarray(image.dataobj)[..., None], volumes, axis=3)
        nibabel.save(nibabel.Nifti1Image(data, image.affine), path)
    assert read_nifti(source / "imagesTr" / "case_000_0000.nii.gz").shape == (48, 40, 6)
    result = run("build-dialogues", source, tmp_path / "out", "--min-labels", "3")
    assert result.exit_code == SKIPPED_EXIT_CODE, result.output
    (error,) = errors(tmp_path / "out")
    assert error["file"].endswith("case_001_0000.nii.gz") and error["item"] == "case case_001"
    assert error["reason"].startswith("4-D volume of 3 volumes (48, 40, 6, 3): MediRound reads one 3-D volume")
    assert {i.rsplit("_axial", 1)[0] for i in built_ids(tmp_path / "out")} == {"case_000"}


def planes(count: int = 4) -> list[np.ndarray]:
    return [np.full((6, 8), 1000 + 10 * z, np.uint16) for z in range(count)]


def test_dicom_folders_that_are_not_one_decodable_volume_are_named(tmp_path: Path) -> None:
    two = tmp_path / "two-series"
    write_dicom_series(two, planes(2))
    (two / "000.dcm").rename(two / "a.dcm")
    write_dicom_series(two, planes(2))
    with pytest.raises(DataError) as caught:
        read_dicom_series(two)
    assert caught.value.field == "SeriesInstanceUID" and caught.value.reason.startswith("2 series in one folder")

    gap = tmp_path / "gap"
    files = write_dicom_series(gap, planes(5))
    files[2].unlink()  # a missing slice: the rest would be misplaced by one step
    with pytest.raises(DataError) as caught:
        read_dicom_series(gap)
    assert caught.value.file == str(files[3]) and "10 mm from" in caught.value.reason and "5 mm apart" in caught.value.reason

    tilted = tmp_path / "tilted"
    files = write_dicom_series(tilted, planes(3))
    odd = pydicom.dcmread(files[1])
    odd.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    odd.save_as(files[1])
    with pytest.raises(DataError, match="not one volume") as caught:
        read_dicom_series(tilted)
    assert caught.value.field == "ImageOrientationPatient"

    mpeg = tmp_path / "mpeg"
    files = write_dicom_series(mpeg, planes(3))
    encoded = pydicom.dcmread(files[1])
    encoded.file_meta.TransferSyntaxUID = MPEG2
    encoded.PixelData = encapsulate([b"not a video stream"])
    encoded.save_as(files[1], enforce_file_format=True)
    with pytest.raises(DataError) as caught:
        read_dicom_series(mpeg).intensities()
    assert caught.value.file == str(files[1]) and caught.value.field == "PixelData"
    assert caught.value.reason.startswith("cannot decode the pixel data (transfer syntax MPEG2 Main Profile / Main Level)")


def write_dicom_case(folder: Path) -> None:
    """A DICOM case of build-dialogues' layout (series + labels.nii.gz on its grid) with patient data."""
    drawn = np.zeros((4, 32, 40), np.uint16)
    write_dicom_series(folder, [1000 + plane for plane in drawn], patient=PATIENT)
    labels = np.zeros((40, 32, 4), np.uint8)  # voxel (column, row, slice)
    labels[2:12, 4:20, 1:3], labels[26:38, 4:20, 1:3], labels[10:30, 22:30, 1:3] = 2, 3, 1
    nibabel.save(nibabel.Nifti1Image(labels, np.diag([-1.0, -1.0, 5.0, 1.0])), folder / "labels.nii.gz")


def patient_data_in(folder: Path) -> list[str]:
    """'file: value' for each patient value (and each part of the name) found in any file under ``folder``."""
    values = [*PATIENT.values(), *PATIENT["PatientName"].split("^"), "2023-01-15", "1961-02-03"]
    return [f"{path.relative_to(folder)}: {value}" for path in sorted(folder.rglob("*")) if path.is_file()
            for value in values if value.encode() in path.read_bytes()]


def test_build_dialogues_from_dicom_writes_no_patient_data(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_dicom_case(source / "case1")
    write_dicom_case(source / "case2")
    bad = pydicom.dcmread(source / "case2" / "001.dcm")
    bad.file_meta.TransferSyntaxUID = MPEG2
    bad.PixelData = encapsulate([b"x"])
    bad.save_as(source / "case2" / "001.dcm", enforce_file_format=True)
    (source / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    assert patient_data_in(source)  # the check finds what is there
    result = run("build-dialogues", source, tmp_path / "out", "--from", "dicom", "--min-labels", "3")
    assert result.exit_code == SKIPPED_EXIT_CODE, result.output
    assert built_ids(tmp_path / "out") == ["case1_axial_0001", "case1_axial_0002"]
    assert errors(tmp_path / "out")[0]["field"] == "PixelData"
    assert patient_data_in(tmp_path / "out") == []
    assert not any(value in result.output for value in PATIENT.values())
