import numpy as np

from mediround.model.references import reference_from_mask


def test_crop_is_masked_cropped_and_padded_to_square():
    image = np.full((10, 20, 3), 200, dtype=np.uint8)
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 4:12] = True  # 4 rows x 8 cols = 32 pixels
    mask[2, 4] = False
    reference = reference_from_mask(image, mask)
    assert reference.crop.shape == (8, 8, 3)
    assert reference.crop[0, 0].tolist() == [0, 0, 0]  # outside the mask inside the box: zeroed
    assert reference.crop[0, 1].tolist() == [200, 200, 200]
    assert reference.crop[4:].max() == 0  # square padding below the 4 cropped rows
    np.testing.assert_allclose(reference.box, [4 / 20, 2 / 10, 12 / 20, 6 / 10])
    assert not reference.whole_image


def test_inclusive_box_ends_at_the_masks_last_column_and_row_with_the_same_crop():
    """``heads.box_max: inclusive`` (the authors' ``get_bounding_box_from_mask``, the 7B preset)."""
    image = np.full((10, 20, 3), 200, dtype=np.uint8)
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 4:12] = True
    inclusive = reference_from_mask(image, mask, box_max="inclusive")
    np.testing.assert_allclose(inclusive.box, [4 / 20, 2 / 10, 11 / 20, 5 / 10])
    np.testing.assert_array_equal(inclusive.crop, reference_from_mask(image, mask).crop)
    np.testing.assert_allclose(reference_from_mask(image, None, box_max="inclusive").box, [0, 0, 19 / 20, 9 / 10])


def test_tiny_or_missing_mask_means_whole_image():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    nine = np.zeros((6, 8), dtype=bool)
    nine[0:3, 0:3] = True
    for mask in (nine, None, np.zeros((6, 8), dtype=bool)):
        reference = reference_from_mask(image, mask)
        assert reference.whole_image
        np.testing.assert_array_equal(reference.box, [0, 0, 1, 1])
        np.testing.assert_array_equal(reference.crop[:6], image)
    ten = nine.copy()
    ten[5, 7] = True
    assert not reference_from_mask(image, ten).whole_image


def test_fourier_box_encoder_is_the_linear_map_of_box_sines_and_cosines():
    import math

    import torch

    from mediround.model.references import BoxEncoder

    encoder = BoxEncoder(hidden=6, fourier_features=3, seed=4)
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    angles = [2 * math.pi * sum((2 * box[0, i].item() - 1) * encoder.frequencies[i, j].item() for i in range(4))
              for j in range(3)]
    inputs = torch.tensor([[*box[0].tolist(), *map(math.sin, angles), *map(math.cos, angles)]])
    torch.testing.assert_close(encoder(box), encoder.linear(inputs))
    assert "frequencies" in encoder.state_dict()
    assert torch.equal(BoxEncoder(6, 3, seed=4).frequencies, encoder.frequencies)
    assert "frequencies" not in BoxEncoder(hidden=6).state_dict()


def test_stray_fragments_leave_the_box_only_when_asked():
    """A predicted mask with two stray pixels far from its structure: by default (the paper's rule) the box
    spans them; with ``min_fragment`` the crop and box are the structure's alone."""
    image = np.full((40, 40, 3), 90, dtype=np.uint8)
    structure = np.zeros((40, 40), dtype=bool)
    structure[5:15, 6:16] = True
    stray = structure.copy()
    stray[35, 38] = stray[36, 38] = True
    spanning = reference_from_mask(image, stray)
    np.testing.assert_allclose(spanning.box, [6 / 40, 5 / 40, 39 / 40, 37 / 40])
    cleaned = reference_from_mask(image, stray, min_fragment=0.1)
    alone = reference_from_mask(image, structure)
    np.testing.assert_array_equal(cleaned.box, alone.box)
    np.testing.assert_array_equal(cleaned.crop, alone.crop)


def test_min_fragment_keeps_large_parts_and_the_largest_one():
    image = np.full((40, 40, 3), 90, dtype=np.uint8)
    two = np.zeros((40, 40), dtype=bool)
    two[2:8, 2:8] = True  # 36 pixels
    two[30:35, 30:35] = True  # 25 pixels: 41% of the foreground, kept at 0.1
    np.testing.assert_allclose(reference_from_mask(image, two, min_fragment=0.1).box, [2 / 40, 2 / 40, 35 / 40, 35 / 40])
    # Every part below the share: the largest stays; the other is dropped.
    np.testing.assert_allclose(reference_from_mask(image, two, min_fragment=0.9).box, [2 / 40, 2 / 40, 8 / 40, 8 / 40])
    # Diagonal neighbours are one part (8-connected).
    diagonal = np.zeros((40, 40), dtype=bool)
    diagonal[range(10, 22), range(10, 22)] = True
    np.testing.assert_allclose(reference_from_mask(image, diagonal, min_fragment=0.5).box, [10 / 40, 10 / 40, 22 / 40, 22 / 40])
    # What is left after dropping is held to the same <= 9 pixel rule.
    scattered = np.zeros((40, 40), dtype=bool)
    scattered[::8, ::8] = True  # 25 single pixels
    assert not reference_from_mask(image, scattered).whole_image
    assert reference_from_mask(image, scattered, min_fragment=0.1).whole_image
