"""``mediround chat VOLUME`` with the shipped tiny model: the masks equal ``infer``'s on the PNG slices
``build-dialogues`` writes for the volume; patient data of a DICOM series reaches only the DICOM-SEG;
bad input is one line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from volume_files import PATIENT, oblique_affine, write_dicom_series

from mediround.data.build import BuildOptions, SliceOptions, SliceRule, build
from mediround.data.build.volumes import display_slice, load_nifti
from mediround.data.images import load_mask
from mediround.data.predictions import mask_relative_path
from mediround_cli.common import BAD_INPUT_EXIT_CODE
from mediround_cli.main import cli

QUESTIONS = ("Segment the liver.", "Segment the lesion inside it.")
PHI_VALUES = [*PATIENT.values(), *PATIENT["PatientName"].split("^"), "2023-01-15", "1961-02-03"]


def run(*args: object):
    return CliRunner().invoke(cli, [*map(str, args)])


def nnunet_case(root: Path) -> Path:
    """An nnU-Net folder of one CT case on an oblique, anisotropic grid (LIA: the axial axis is voxel
    axis 1) whose label covers every axial slice, so build-dialogues writes every slice's PNG."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(3)
    hu = rng.normal(-40, 60, (36, 5, 30))
    labels = np.zeros(hu.shape, np.uint8)
    labels[6:26, :, 8:24] = 1
    hu += 180 * labels
    hu[14:20, :, 12:18] += 150  # a brighter lesion inside
    nibabel.save(nibabel.Nifti1Image(hu.astype(np.int16), oblique_affine()), root / "imagesTr" / "case_000_0000.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, oblique_affine()), root / "labelsTr" / "case_000.nii.gz")
    return root


@pytest.mark.slow
def test_chat_volume_masks_equal_infer_on_the_built_png_slices(tmp_path: Path) -> None:
    source = nnunet_case(tmp_path / "Dataset001_Toy")
    options = BuildOptions(min_rounds=1, max_rounds=1, split=(0, 0, 100),
                           slices=SliceOptions("axial", SliceRule("every", min_labels=1), "auto"))
    built = build(source, tmp_path / "built", options=options)
    images = sorted((tmp_path / "built" / "images").glob("*.png"))
    assert built.images == len(images) == 5
    lines = [{"id": image.stem, "image": f"images/{image.name}",
              "rounds": [{"query": QUESTIONS[0]}, {"query": QUESTIONS[1], "ref": 1}]} for image in images]
    data = tmp_path / "built" / "slices.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    inferred = run("infer", data, "--out", tmp_path / "preds")
    assert inferred.exit_code == 0, inferred.output

    chatted = run("chat", source / "imagesTr" / "case_000_0000.nii.gz", "-q", QUESTIONS[0], "-q", f"@1 {QUESTIONS[1]}",
                  "--case-id", "case_000", "--per-round", "--batch-size", "2", "--out", tmp_path / "chat")
    assert chatted.exit_code == 0, chatted.output
    assert "window abdomen (auto: modality CT)" in " ".join(chatted.output.split())
    sidecar = json.loads((tmp_path / "chat" / "case_000_labels.json").read_text())
    assert sidecar["model"]["beta"] == 0.6 and sidecar["slices"]["run"] == list(range(5))
    masks = [load_nifti(tmp_path / "chat" / f"case_000_round-{number}.nii.gz") for number in (1, 2)]
    assert masks[0].shape == (36, 30, 5)
    compared = 0
    for index in range(5):
        for number, volume in enumerate(masks, start=1):
            predicted = load_mask(tmp_path / "preds" / mask_relative_path(f"case_000_axial_{index:04d}", number))
            assert np.array_equal(display_slice(volume, "axial", index) > 0, predicted), (index, number)
            compared += int(predicted.any())
    assert compared > 0  # not a comparison of empty masks only
    labels = nibabel.load(tmp_path / "chat" / "case_000_labels.nii.gz")
    assert labels.shape == (36, 5, 30) and np.allclose(labels.affine, oblique_affine(), atol=1e-5)


def test_chat_on_a_dicom_series_keeps_patient_data_in_the_dicom_seg_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = write_dicom_series(tmp_path / "scan-7", [rng.integers(900, 1300, (20, 24)).astype(np.uint16) for _ in range(3)],
                               intercept=-1024.0, pixel_spacing=(0.8, 0.7), step=3.0, patient=PATIENT)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    result = run("chat", tmp_path / "scan-7", "-q", QUESTIONS[0], "-q", f"@1 {QUESTIONS[1]}", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = sorted(path for path in (tmp_path / "out").rglob("*") if path.is_file())
    (seg,) = [path for path in written if path.suffix == ".dcm"]
    assert pydicom.dcmread(seg).PatientID == PATIENT["PatientID"]  # the DICOM-SEG carries them, as it must
    leaks = [f"{path.name}: {value}" for path in written if path != seg for value in [*PHI_VALUES, series_uid]
             if value.encode() in path.read_bytes() or value in path.name]
    assert leaks == [] and len(written) == 2
    outside = run("chat", tmp_path / "scan-7", "-q", QUESTIONS[0], "--slices", "2:9", "--out", tmp_path / "bad")
    assert outside.exit_code == BAD_INPUT_EXIT_CODE and "slice range 2:9 lies outside the volume's 3" in outside.output
    assert not [value for value in PHI_VALUES if value in result.output + outside.output]


def test_bad_volume_input_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    four_d = tmp_path / "fmri.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 4, 3), np.int16), np.eye(4)), four_d)
    result = run("chat", four_d, "-q", "Segment the liver.")
    assert result.exit_code == BAD_INPUT_EXIT_CODE
    assert result.output.strip().splitlines()[-1].startswith(f"error: {four_d}: 4-D volume of 3 volumes")
    refs = run("chat", four_d, "-q", "Segment the liver.", "-q", "@2 Segment what lies below it.")
    assert refs.exit_code == BAD_INPUT_EXIT_CODE and "question 2" in refs.output and "not an earlier round" in refs.output
    window = run("chat", four_d, "-q", "Segment the liver.", "--window", "brain,40")
    assert window.exit_code == BAD_INPUT_EXIT_CODE and "Invalid value for '--window'" in window.output
    png = tmp_path / "slice.png"
    png.write_bytes(b"")
    flat = run("chat", png, "-q", "Segment the liver.", "--per-round", "--slices", "1:3")
    assert flat.exit_code == BAD_INPUT_EXIT_CODE and "--slices, --per-round: for volumes only" in flat.output
    write_dicom_series(tmp_path / "series", [np.zeros((6, 8), np.uint16)] * 2)
    dicom = run("chat", tmp_path / "series", "-q", "Segment the liver.", "--per-round")
    assert dicom.exit_code == BAD_INPUT_EXIT_CODE and "--per-round is for NIfTI volumes" in dicom.output
