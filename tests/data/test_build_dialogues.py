"""``mediround build-dialogues``: demo sets, a written nnU-Net set and DICOM series, relations on known
geometry, the ambiguity guarantee, case-level splits, workers/shards/merge, train + eval on the output."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from volume_files import LABELS, dicom_file, write_dicom_series, write_nnunet

from mediround.data.build import BuildOptions, SliceOptions, SliceRule, build
from mediround.data.build.dialogues import SHAPE_LINKS, Planner, direction_links, image_rng
from mediround.data.build.relations import (
    Structure,
    ambiguous_without_reference,
    by_size,
    container,
    content,
    counterpart,
    nearest,
    touching,
    towards,
)
from mediround.data.build.volumes import (
    display_slice,
    load_dicom_seg,
    load_dicom_series,
    map_intensities,
    read_dicom_series,
)
from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.data.validate import validate
from mediround.training.recipe import resolve_recipe
from mediround_cli.common import SKIPPED_EXIT_CODE
from mediround_cli.main import cli

DATA = Path("/work/shared/data")
SAM_MED2D = DATA / "sam-med2d-demo"
BIOMEDPARSE = DATA / "biomedparse-demo"


def box(top: int, left: int, bottom: int, right: int, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top:bottom, left:right] = True
    return mask


def run(*args: str):
    return CliRunner().invoke(cli, [*map(str, args)])


def all_rounds(out: Path) -> list:
    files = [out / f"{split}.jsonl" for split in ("train", "val", "test")]
    return [d for file in files if file.exists() for d in load_dialogues(file).dialogues]


def test_relations_follow_known_geometry() -> None:
    liver = Structure("liver", box(0, 4, 20, 30))
    lesion = Structure("liver tumor", box(5, 10, 11, 16))
    left = Structure("left kidney", box(40, 44, 56, 56))
    right = Structure("right kidney", box(40, 8, 50, 16))
    spleen = Structure("spleen", box(4, 40, 20, 60))
    shapes = [liver, lesion, left, right, spleen]
    assert container(shapes, 1) == 0 and content(shapes, 0) == 1 and content(shapes, 2) is None
    assert counterpart(shapes, 2) == 3 and counterpart(shapes, 3) == 2 and counterpart(shapes, 0) is None
    assert by_size(True)(shapes, 3) == 2 and by_size(False)(shapes, 2) == 3 and by_size(True)(shapes, 2) is None
    assert towards("right")(shapes, 3) == 2 and towards("left")(shapes, 2) == 3
    assert towards("down")(shapes, 4) == 2 and towards("up")(shapes, 2) == 4
    assert nearest(shapes, 3) == 0  # the liver is 21 px away, the left kidney 28 px
    touching_shapes = [Structure("a", box(0, 0, 10, 10)), Structure("b", box(0, 10, 10, 20)), Structure("c", box(30, 30, 40, 40))]
    assert touching(touching_shapes, 0) == 1 and touching(touching_shapes, 2) is None


def test_side_words_are_radiological_unless_image_wording() -> None:
    radiological = {link.key: link.phrase for link in direction_links(None, True)}
    assert radiological["towards-right"] == "on the patient's left of {x}"
    flipped = {link.key: link.phrase for link in direction_links(None, False)}
    assert flipped["towards-right"] == "on the patient's right of {x}"
    image = {link.key: link.phrase for link in direction_links(None, None)}
    assert image["towards-right"] == "to the right of {x} in the image"
    axial = {link.key: link.phrase for link in direction_links("axial", True)}
    assert axial["towards-up"] == "in front of {x}"


def test_relation_ambiguous_without_reference_only_when_another_source_reaches_another_mask() -> None:
    pair = [Structure("left kidney", box(0, 40, 10, 50)), Structure("right kidney", box(0, 0, 10, 10))]
    assert ambiguous_without_reference(counterpart, pair, 0)
    single = [Structure("liver", box(0, 0, 20, 20)), Structure("liver tumor", box(5, 5, 10, 10))]
    assert not ambiguous_without_reference(content, single, 0)  # "the lesion inside it": only one reading
    # Identical masks (BiomedParse's COVID-19 infection equal to the lungs) are one target, not two.
    same = [Structure("a", box(0, 0, 5, 5)), Structure("b", box(0, 20, 5, 25)), Structure("c", box(0, 20, 5, 25))]
    assert not ambiguous_without_reference(towards("right"), same, 0)


def test_unambiguous_relations_are_never_reference_only() -> None:
    """A liver and its tumour: "the lesion inside it" and "the structure that contains it" each have a
    single reading, so no round may rely on its reference alone; with a kidney pair, "the kidney on the
    other side from it" has two readings, and reference-only rounds appear."""
    plain = [Structure("liver", box(4, 4, 30, 30)), Structure("liver tumor", box(10, 10, 16, 16))]
    pair = [Structure("left kidney", box(20, 44, 40, 56)), Structure("right kidney", box(20, 8, 40, 20))]
    reference_only = {"plain": 0, "pair": 0}
    for name, shapes in (("plain", plain), ("pair", pair)):
        planner = Planner(shapes, SHAPE_LINKS + direction_links(None, True))
        for seed in range(40):
            planned = planner.plan(image_rng(seed, name), 2, 3)
            assert planned is not None
            reference_only[name] += sum(1 for p in planned[1] if p.ref is not None and not p.names_target)
    assert reference_only["plain"] == 0 and reference_only["pair"] > 0


def test_sa_med2d_demo_builds_valid_multi_round_dialogues(tmp_path: Path) -> None:
    result = run("build-dialogues", SAM_MED2D, tmp_path / "out", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "rounds by reference use: reference only" in result.output and "images/s" in result.output
    dialogues = all_rounds(tmp_path / "out")
    assert len(dialogues) == 4 and all(len(d.rounds) >= 2 for d in dialogues)
    assert any(r.ref is not None and not r.names_target for d in dialogues for r in d.rounds)
    for file in (tmp_path / "out").glob("*.jsonl"):
        assert validate(file).ok
    manifest = json.loads((tmp_path / "out" / "build.json").read_text())
    assert set(manifest["cases"]) == {"amos_0004", "amos_0006", "s0114", "s0619"}  # amos_0507: no masks
    # The masks written equal the source masks.
    liver = next(d for d in dialogues if d.id == "amos_0004_75")
    number = next(n for n, r in enumerate(liver.rounds, 1) if r.entity == "liver")
    source = load_mask(SAM_MED2D / "data_demo" / "masks" / "amos_0004_75_liver_000.png")
    assert np.array_equal(load_mask(liver.mask_path(number)), source)


def test_biomedparse_demo_builds_mrmedseg_that_validates(tmp_path: Path) -> None:
    result = run("build-dialogues", BIOMEDPARSE, tmp_path / "out", "--format", "mrmedseg", "--rounds", "2..4")
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out").glob("*.json"))
    assert {f.name for f in files} <= {"train.json", "val.json", "test.json", "build.json"}
    files = [f for f in files if f.name != "build.json"]
    loaded = [d for f in files for d in load_dialogues(f).dialogues]
    assert loaded and all(2 <= len(d.rounds) <= 4 for d in loaded)
    assert {d.modality for d in loaded} >= {"CT", "MRI"}
    abdomen = next(d for d in loaded if d.id == "06_CT_abdomen")
    assert len(abdomen.rounds) >= 2
    for file in files:
        report = validate(file)
        assert report.ok, [p.one_line() for p in report.problems]


def test_nnunet_volumes_slices_windows_sides_and_case_level_split(tmp_path: Path) -> None:
    source = write_nnunet(tmp_path / "Dataset001_Toy")
    result = run("build-dialogues", source, tmp_path / "out", "--window", "abdomen", "--min-labels", "3", "--step", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "build.json").read_text())
    assert manifest["kind"] == "nnunet" and set(manifest["cases"]) == {"case_000", "case_001"}
    dialogues = all_rounds(tmp_path / "out")
    # slices 1..4 hold all three labels; 0 and 5 only the liver.
    assert sorted(d.id for d in dialogues) == [f"case_{c:03d}_axial_{k:04d}" for c in range(2) for k in range(1, 5)]
    for file in (tmp_path / "out").glob("*.jsonl"):
        split = file.stem
        ids = {d.id.rsplit("_axial", 1)[0] for d in load_dialogues(file).dialogues}
        assert all(manifest["cases"][case]["split"] == split for case in ids)
    for dialogue in dialogues:
        for number, round_ in enumerate(dialogue.rounds, start=1):
            if round_.entity == "left kidney":  # patient's left is on the image's right
                columns = np.nonzero(load_mask(dialogue.mask_path(number)))[1]
                assert columns.mean() > load_mask(dialogue.mask_path(number)).shape[1] / 2
    image = load_image(dialogues[0].image_path)[..., 0]
    assert image.shape == (40, 48) and image.max() > image.min()


def test_largest_slice_rule_and_percentile_scaling(tmp_path: Path) -> None:
    source = write_nnunet(tmp_path / "Dataset002_Toy", cases=1)
    options = BuildOptions(min_rounds=1, slices=SliceOptions("coronal", SliceRule("largest", label="liver"), "percentile"))
    summary = build(source, tmp_path / "out", options=options)
    assert summary.images == 1
    assert map_intensities(np.array([-1000.0, 40.0, 240.0, 3000.0]), "abdomen").tolist() == [0, 128, 255, 255]


def test_dicom_series_hounsfield_units_slice_order_and_orientation(tmp_path: Path) -> None:
    planes = [np.full((32, 40), 1000 + 10 * z, np.uint16) for z in range(4)]
    for plane in planes:
        plane[0, 0] = 3000  # row 0, column 0: the patient's right, anterior corner (LPS origin)
    write_dicom_series(tmp_path / "src" / "case1", planes, slope=2.0, intercept=-1024.0)
    volume, modality = load_dicom_series(tmp_path / "src" / "case1")
    assert modality == "CT" and volume.shape == (40, 32, 4)
    for z in range(4):  # inferior to superior, in HU = 2 * stored - 1024
        shown = display_slice(volume, "axial", z)
        assert shown.shape == (32, 40) and shown[5, 5] == 2 * (1000 + 10 * z) - 1024
        assert shown[0, 0] == 2 * 3000 - 1024  # displayed top left, as the scanner shows it
    labels = np.zeros((40, 32, 4), np.uint8)  # voxel (column, row, slice), RAS affine of the series
    labels[2:12, 4:20, 1:3] = 2
    labels[26:38, 4:20, 1:3] = 3
    labels[10:30, 22:30, 1:3] = 1
    nibabel.save(nibabel.Nifti1Image(labels, np.diag([-1.0, -1.0, 5.0, 1.0])), tmp_path / "src" / "case1" / "labels.nii.gz")
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    result = run("build-dialogues", tmp_path / "src", tmp_path / "out", "--from", "dicom", "--min-labels", "3")
    assert result.exit_code == 0, result.output
    dialogues = all_rounds(tmp_path / "out")
    assert [d.id for d in dialogues] == ["case1_axial_0001", "case1_axial_0002"]
    for dialogue in dialogues:
        for number, round_ in enumerate(dialogue.rounds, start=1):
            # value 2 sits at low column indices: towards the patient's right (LPS +x is the patient's
            # left), so the radiological display puts it on the image's left whatever its name says.
            if round_.entity == "left kidney":
                mask = load_mask(dialogue.mask_path(number))
                assert np.nonzero(mask)[1].mean() < mask.shape[1] / 2


def test_missing_volume_extra_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    source = write_nnunet(tmp_path / "Dataset003_Toy", cases=1)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    result = run("build-dialogues", source, tmp_path / "out")
    assert result.exit_code != 0 and 'pip install "mediround[volumes]"' in result.output


def test_output_is_the_same_for_any_workers_and_shards(tmp_path: Path) -> None:
    one = build(SAM_MED2D, tmp_path / "one", options=BuildOptions(seed=5))
    two = build(SAM_MED2D, tmp_path / "two", options=BuildOptions(seed=5), workers=2)
    for i in (1, 2):
        build(SAM_MED2D, tmp_path / f"shard{i}", options=BuildOptions(seed=5), shard=(i, 2))
    assert run("build-dialogues", "--merge", tmp_path / "shard1", tmp_path / "shard2", tmp_path / "merged").exit_code == 0
    assert set(one.files) == set(two.files)
    for path in one.files.values():
        expected = path.read_bytes()
        assert (tmp_path / "two" / path.name).read_bytes() == expected
        assert (tmp_path / "merged" / path.name).read_bytes() == expected
    assert one.rounds == two.rounds
    merged = json.loads((tmp_path / "merged" / "build.json").read_text())
    assert merged["cases"] == json.loads((tmp_path / "one" / "build.json").read_text())["cases"]
    overlap = run("build-dialogues", "--merge", tmp_path / "shard1", tmp_path / "shard1", tmp_path / "bad")
    assert overlap.exit_code != 0 and "shards overlap" in overlap.output


def test_convert_sa_med2d_is_multi_round_unless_single_round(tmp_path: Path) -> None:
    assert run("convert", SAM_MED2D, tmp_path / "multi.jsonl").exit_code == 0
    multi = load_dialogues(tmp_path / "multi.jsonl").dialogues
    assert len(multi) == 4 and max(len(d.rounds) for d in multi) >= 2 and validate(tmp_path / "multi.jsonl").ok
    assert run("convert", SAM_MED2D, tmp_path / "single.jsonl", "--single-round").exit_code == 0
    masks = list((SAM_MED2D / "data_demo" / "masks").glob("*.png"))
    assert len(load_dialogues(tmp_path / "single.jsonl", allow_outside_root=True).dialogues) == len(masks)


@pytest.mark.slow
def test_train_and_eval_run_on_built_dialogues(tmp_path: Path) -> None:
    out = tmp_path / "built"
    assert run("build-dialogues", SAM_MED2D, out, "--rounds", "2..3").exit_code == 0
    recipe = yaml.safe_load(resolve_recipe("recipes/tiny-cpu.yaml").read_text())
    recipe["output"] = str(tmp_path / "run")
    recipe["data"] = {"train": str(out / "test.jsonl"), "val": None}
    recipe["train"] = {**recipe.get("train", {}), "max_steps": 2, "batch_size": 1, "threads": 1, "warmup_steps": 1}
    recipe["validation"] = {"every": 0, "at_start": False}
    recipe["checkpoint"] = {"every": 0, "keep_last": 1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trained = run("train", tmp_path / "recipe.yaml", "--cpu")
    assert trained.exit_code == 0, trained.output
    model = max((tmp_path / "run" / "checkpoints").glob("step-*")) / "model"
    evaluated = run("eval", out / "test.jsonl", "--model", model, "--predictions-out", tmp_path / "predictions")
    assert evaluated.exit_code == 0, evaluated.output
    assert "gIoU" in evaluated.output or "Dice" in evaluated.output


def write_dicom_seg(path: Path, series: Path, frames: list[tuple[int, int, np.ndarray]], kind: str, placed_by: str) -> None:
    """A DICOM-SEG object over ``series``: (segment, slice index, (rows, columns) mask) per frame, BINARY
    (1 bit, packed) or FRACTIONAL (8 bits, 0..255), frames placed by PlanePositionSequence or by
    DerivationImageSequence."""
    slices = sorted((pydicom.dcmread(f) for f in series.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    ds = dicom_file("1.2.840.10008.5.1.4.1.1.66.4")
    ds.Modality, ds.SegmentationType = "SEG", kind
    ds.Rows, ds.Columns, ds.NumberOfFrames = slices[0].Rows, slices[0].Columns, len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.ImageOrientationPatient, ds.PixelSpacing = slices[0].ImageOrientationPatient, slices[0].PixelSpacing
    ds.SegmentSequence = [pydicom.Dataset() for _ in range(2)]
    for number, (item, label) in enumerate(zip(ds.SegmentSequence, ("liver", "left kidney")), start=1):
        item.SegmentNumber, item.SegmentLabel = number, label
    per_frame = []
    for segment, index, _ in frames:
        groups, identification = pydicom.Dataset(), pydicom.Dataset()
        identification.ReferencedSegmentNumber = segment
        groups.SegmentIdentificationSequence = [identification]
        if placed_by == "position":
            position = pydicom.Dataset()
            position.ImagePositionPatient = slices[index].ImagePositionPatient
            groups.PlanePositionSequence = [position]
        else:
            source, derivation = pydicom.Dataset(), pydicom.Dataset()
            source.ReferencedSOPInstanceUID = slices[index].SOPInstanceUID
            derivation.SourceImageSequence = [source]
            groups.DerivationImageSequence = [derivation]
        per_frame.append(groups)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    masks = np.stack([mask for _, _, mask in frames])
    if kind == "BINARY":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = np.packbits(masks.astype(np.uint8).ravel(), bitorder="little").tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.MaximumFractionalValue = 8, 8, 7, 255
        # 0.6 of the maximum is foreground, 0.3 is not: the reader thresholds at half.
        ds.PixelData = np.where(masks, 153, 76).astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(("kind", "placed_by"), [("BINARY", "position"), ("FRACTIONAL", "derivation")])
def test_dicom_seg_label_volume_lies_on_the_series_grid(tmp_path: Path, kind: str, placed_by: str) -> None:
    """3 CT slices 16x16 whose stored values encode the label the test draws there (1000 + 100 * label);
    the SEG holds 2 segments, frames out of slice order, one slice without any: the label volume read
    from the SEG must equal the one the intensities encode, voxel for voxel."""
    drawn = np.zeros((3, 16, 16), np.int64)  # (slice, row, column)
    drawn[0:2, 2:8, 3:11] = 1
    drawn[1:3, 10:14, 9:14] = 2
    case = tmp_path / "src" / "case1"
    write_dicom_series(case, [1000 + 100 * plane for plane in drawn], slope=1.0, intercept=0.0)
    frames = [(2, 2, drawn[2] == 2), (1, 0, drawn[0] == 1), (2, 1, drawn[1] == 2), (1, 1, drawn[1] == 1)]
    write_dicom_seg(case / "seg.dcm", case, frames, kind, placed_by)
    series = read_dicom_series(case)
    labels, names = load_dicom_seg(case / "seg.dcm", series)
    assert names == {1: "liver", 2: "left kidney"}
    assert labels.dtype.kind == "i" and np.array_equal(labels, np.rint((series.intensities() - 1000) / 100))
    assert np.array_equal(display_slice(labels, "axial", 1), drawn[1])  # shown as the scanner stores the slice
    # The SEG sits beside the slices, no dataset.json: names come from its SegmentLabels.
    result = run("build-dialogues", tmp_path / "src", tmp_path / "out", "--from", "dicom", "--min-labels", "2")
    assert result.exit_code == 0, result.output
    (dialogue,) = all_rounds(tmp_path / "out")
    assert dialogue.id == "case1_axial_0001" and {r.entity for r in dialogue.rounds} == {"liver", "left kidney"}


def copy_sa_med2d_demo(root: Path) -> Path:
    """The SA-Med2D demo with one corrupt mask (amos_0006_90's spleen) and one mask of the wrong size
    (s0619_32's colon)."""
    shutil.copytree(SAM_MED2D, root)
    masks = root / "data_demo" / "masks"
    (masks / "amos_0006_90_spleen_000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(masks / "s0619_32_colon_000.png")
    return root


def test_bad_masks_skip_their_image_are_listed_and_the_rest_is_built(tmp_path: Path) -> None:
    source = copy_sa_med2d_demo(tmp_path / "demo")
    result = run("build-dialogues", source, tmp_path / "out", "--seed", "3")
    assert result.exit_code == SKIPPED_EXIT_CODE, result.output
    assert "2 unreadable case(s) or image(s) skipped" in result.output and "errors.jsonl" in result.output
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(Path(e["file"]).name, e["item"], e["field"]) for e in errors] == [
        ("amos_0006_90_spleen_000.png", "case amos_0006: image amos_0006_90.png", "mask"),
        ("s0619_32_colon_000.png", "case s0619: image s0619_32.png", "mask"),
    ]
    assert "corrupt image" in errors[0]["reason"] and "mask is 12x10" in errors[1]["reason"]
    assert sorted(d.id for d in all_rounds(tmp_path / "out")) == ["amos_0004_75", "s0114_111"]
    # Shards carry their errors (of 3 shards, the 1st holds s0619, the 2nd amos_0006); merging
    # concatenates them in the order the shards are given.
    shards = [tmp_path / f"shard{i}" for i in (1, 2, 3)]
    for i, shard in enumerate(shards, start=1):
        built = run("build-dialogues", source, shard, "--seed", "3", "--shard", f"{i}/3")
        assert built.exit_code == (0 if i == 3 else SKIPPED_EXIT_CODE), built.output
    shard_errors = [(shard / "errors.jsonl").read_text() for shard in shards[:2]]
    assert "s0619" in shard_errors[0] and "amos_0006" in shard_errors[1] and not (shards[2] / "errors.jsonl").exists()
    merged = run("build-dialogues", "--merge", *shards, tmp_path / "merged")
    assert merged.exit_code == SKIPPED_EXIT_CODE, merged.output
    assert (tmp_path / "merged" / "errors.jsonl").read_text() == "".join(shard_errors)
    assert (tmp_path / "merged" / "train.jsonl").read_bytes() == (tmp_path / "out" / "train.jsonl").read_bytes()


def test_label_volume_of_another_shape_skips_its_case(tmp_path: Path) -> None:
    source = write_nnunet(tmp_path / "Dataset004_Toy", cases=2)
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), source / "labelsTr" / "case_001.nii.gz")
    summary = build(source, tmp_path / "out", options=BuildOptions(min_rounds=1))
    (error,) = summary.errors
    assert error["item"] == "case case_001" and error["field"] == "labels" and "(8, 8, 2)" in error["reason"]
    assert summary.dialogues.total() > 0 and {d.id.split("_axial")[0] for d in all_rounds(tmp_path / "out")} == {"case_000"}


def test_split_percentages_choose_the_split_and_are_checked(tmp_path: Path) -> None:
    result = run("build-dialogues", SAM_MED2D, tmp_path / "out", "--split", "0/0/100")
    assert result.exit_code == 0, result.output
    assert [f.name for f in (tmp_path / "out").glob("*.jsonl")] == ["test.jsonl"]  # no errors.jsonl: none skipped
    bad = run("build-dialogues", SAM_MED2D, tmp_path / "bad", "--split", "80/10/5")
    assert bad.exit_code == 2 and "--split" in bad.output and "summing to 100" in bad.output
    assert not (tmp_path / "bad").exists()
