"""Decoding images and masks of every mode, header-only sizes, and clean refusals of bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dialogue_files import write_png
from PIL import Image

from mediround.data import images
from mediround.data.images import image_size, load_image, load_mask, save_mask
from mediround.errors import DataError


def test_16bit_greyscale_is_windowed_by_percentiles(tmp_path: Path) -> None:
    # 201 values 0, 300, ..., 60000: the 0.5th percentile is 300 and the 99.5th 59700 (linear interpolation),
    # so 20100 maps to (20100 - 300) / 59400 * 255 = 85 exactly, and both ends are clipped, not wrapped.
    values = (np.arange(201) * 300).astype(np.uint16).reshape(1, 201)
    path = tmp_path / "ct16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_image(path)
    assert rgb.shape == (1, 201, 3) and rgb.dtype == np.uint8
    assert rgb[0, [0, 1, 67, 199, 200], 0].tolist() == [0, 0, 85, 255, 255]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    truncated = (values >> 8).astype(np.uint8)
    assert not np.array_equal(rgb[..., 0], truncated)


def test_constant_16bit_image_becomes_black(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((3, 3), 1234, dtype=np.uint16)).save(path)
    assert not load_image(path).any()


def test_palette_image_decodes_to_its_colours(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path)
    assert load_image(path).tolist() == [[[0, 0, 0], [200, 10, 30]]]
    assert load_mask(path).tolist() == [[False, True]]


def test_grey_la_and_rgba_modes(tmp_path: Path) -> None:
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    write_png(tmp_path / "l.png", grey)
    assert load_image(tmp_path / "l.png")[..., 1].tolist() == grey.tolist()
    Image.fromarray(np.stack([grey, np.zeros_like(grey)], axis=-1), mode="LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[..., 0].tolist() == grey.tolist()
    rgba = np.zeros((1, 1, 4), dtype=np.uint8)
    rgba[0, 0] = [10, 20, 30, 0]
    write_png(tmp_path / "rgba.png", rgba)
    assert load_image(tmp_path / "rgba.png").tolist() == [[[10, 20, 30]]]


def test_mask_foreground_is_first_channel_above_zero(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 1, 0] = 255
    rgba[0, 2, 1] = 255
    rgba[..., 3] = 255
    write_png(tmp_path / "mask_rgba.png", rgba)
    assert load_mask(tmp_path / "mask_rgba.png").tolist() == [[False, True, False]]
    write_png(tmp_path / "mask_l.png", np.array([[0, 1, 255]], dtype=np.uint8))
    assert load_mask(tmp_path / "mask_l.png").tolist() == [[False, True, True]]


def test_save_mask_writes_0_255_png_and_leaves_no_temporary(tmp_path: Path) -> None:
    mask = np.array([[True, False, True], [False, False, True]])
    path = tmp_path / "out" / "m.png"
    save_mask(path, mask)
    stored = Image.open(path)
    assert stored.mode == "L" and stored.format == "PNG"
    assert np.asarray(stored).tolist() == [[255, 0, 255], [0, 0, 255]]
    assert np.array_equal(load_mask(path), mask)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]
    with pytest.raises(DataError, match="2-D"):
        save_mask(tmp_path / "bad.png", np.zeros((2, 2, 3), dtype=bool))


def test_image_size_reads_only_the_header(tmp_path: Path) -> None:
    path = write_png(
        tmp_path / "full.png", np.zeros((40, 30), dtype=np.uint8) + np.arange(30, dtype=np.uint8)
    )
    data = path.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    assert image_size(truncated) == (30, 40)
    with pytest.raises(DataError) as caught:
        load_image(truncated)
    assert caught.value.file == str(truncated) and "corrupt" in caught.value.reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "file not found"),
        (b"", "empty file"),
        (b"plain text, not an image", "not a readable image"),
        (b"\x89PNG\r\n\x1a\nnot really", "corrupt image"),
    ],
)
def test_missing_empty_and_corrupt_files_raise_data_error(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    for reader in (load_image, load_mask, image_size):
        with pytest.raises(DataError) as caught:
            reader(path)
        assert caught.value.file == str(path)
        assert reason in caught.value.reason


def test_oversized_images_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_png(tmp_path / "big.png", np.zeros((10, 10), dtype=np.uint8))
    monkeypatch.setattr(images, "MAX_PIXELS", 99)
    with pytest.raises(DataError, match="too large: 10x10 exceeds 99 pixels"):
        load_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(DataError, match="too large"):
        load_mask(path)


def test_real_rgba_slice_and_mask(shared_data) -> None:
    image = shared_data("biomedparse-demo", "demo", "01_CT_lung.png")
    mask = shared_data("biomedparse-demo", "demo_mask", "01_CT_lung_nodule.png")
    rgb = load_image(image)
    foreground = load_mask(mask)
    assert rgb.shape == (1024, 1024, 3) and foreground.shape == (1024, 1024)
    assert 0 < foreground.sum() < foreground.size
    assert np.array_equal(foreground, np.asarray(Image.open(mask))[..., 0] > 0)
