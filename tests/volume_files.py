"""Volumes the tests write themselves: nnU-Net folders (nibabel) and DICOM series (pydicom), in any
orientation and spacing, with patient data set where a test looks for leaks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LABELS = {"background": 0, "liver": 1, "left kidney": 2, "right kidney": 3}
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = {
    "PatientName": "Doe^Jane^Quincy", "PatientID": "PID-48151623", "PatientBirthDate": "19610203",
    "StudyDate": "20230115", "SeriesDate": "20230116", "AcquisitionDate": "20230117", "ContentDate": "20230118",
}
"""Patient data of the leak tests: each value is distinctive enough that finding it in a file is a leak."""


def write_nnunet(root: Path, cases: int = 2) -> Path:
    """nnU-Net raw layout: CT volumes in HU (identity RAS affine) with liver and two kidneys; the left
    kidney sits at low x voxel indices, i.e. towards the patient's left in RAS+."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for case in range(cases):
        labels = np.zeros((48, 40, 6), np.uint8)
        labels[30:44, 8:30, :] = 1  # liver: patient's right (high x)
        labels[4:14, 24:34, 1:5] = 2  # left kidney: patient's left (low x)
        labels[34:44, 30:38, 1:5] = 3  # right kidney
        hu = rng.normal(-50, 20, labels.shape) + 100 * (labels > 0)
        affine = np.eye(4)
        nibabel.save(nibabel.Nifti1Image(hu.astype(np.float32), affine), root / "imagesTr" / f"case_{case:03d}_0000.nii.gz")
        nibabel.save(nibabel.Nifti1Image(labels, affine), root / "labelsTr" / f"case_{case:03d}.nii.gz")
    return root


def oblique_affine(spacing: tuple[float, float, float] = (0.8, 1.1, 2.5)) -> np.ndarray:
    """A voxel-to-world (RAS) affine far from RAS+: voxel axes run roughly left, inferior and anterior
    (LIA), tilted by 10 degrees, spacing anisotropic, origin off zero."""
    angle = np.deg2rad(10.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    axes = np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T  # columns: where voxel i, j, k point
    affine = np.eye(4)
    affine[:3, :3] = tilt @ axes @ np.diag(spacing)
    affine[:3, 3] = (31.5, -12.25, 7.0)
    return affine


def dicom_file(sop_class: str) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    return ds


def write_dicom_series(folder: Path, planes: list[np.ndarray], slope: float = 1.0, intercept: float = 0.0, *,
                       orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), pixel_spacing: tuple[float, float] = (1.0, 1.0),
                       step: float = 5.0, origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                       patient: dict[str, str] | None = None, series: str | None = None) -> list[Path]:
    """CT slices (``planes``: (rows, columns) stored values, in order along the slice normal, ``step`` mm
    apart from ``origin``), written in reverse order with scrambled InstanceNumbers; ``orientation`` is
    ImageOrientationPatient (LPS row and column cosines), ``pixel_spacing`` (row, column) spacing;
    ``patient`` sets patient/study attributes. Returns the files, in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    study, frame_of_reference = generate_uid(), generate_uid()
    cosines = np.array(orientation, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    files = []
    for order, (z, plane) in enumerate(reversed(list(enumerate(planes)))):
        ds = dicom_file(CT_IMAGE_STORAGE)
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series, (order * 7) % 5 + 1
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame_of_reference
        for keyword, value in (patient or {}).items():
            setattr(ds, keyword, value)
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + step * z * normal]
        ds.ImageOrientationPatient = [float(v) for v in cosines]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = step
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = plane.astype(np.uint16).tobytes()
        ds.save_as(folder / f"{order:03d}.dcm", enforce_file_format=True)
        files.append(folder / f"{order:03d}.dcm")
    return files[::-1]
