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


def _ct_like(height: int = 12, width: int = 16) -> np.ndarray:
    """A slice with a black border: pixels lit (value 120) only in rows 3-8, columns 4-11."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[3:9, 4:12] = 120
    return image


def test_masked_image_rule_cuts_the_crop_to_the_lit_pixels_and_the_box_to_the_mask():
    """``heads.predicted_reference: masked-image`` (the authors' validation): a predicted mask reaching into the
    black border gets a crop cut to the masked image's non-black pixels, while the box token bounds the mask."""
    from mediround.model.references import PredictedMask, reference_from_prediction

    image = _ct_like()
    mask = np.zeros((12, 16), dtype=bool)
    mask[1:6, 2:8] = True  # rows 1-5, columns 2-7; lit where it meets rows 3-5, columns 4-7
    reference = reference_from_prediction(image, PredictedMask(mask), "masked-image", box_max="inclusive")
    assert reference.crop.shape == (4, 4, 3) and not reference.whole_image
    assert (reference.crop[:3] == 120).all() and reference.crop[3:].max() == 0  # 3 lit rows, padded
    np.testing.assert_allclose(reference.box, [2 / 16, 1 / 12, 7 / 16, 5 / 12])
    by_mask = reference_from_prediction(image, PredictedMask(mask), "mask", box_max="inclusive")
    assert by_mask.crop.shape == (6, 6, 3)  # the mask rule crops the mask's own box
    np.testing.assert_array_equal(by_mask.box, reference.box)


def test_masked_image_rule_counts_lit_pixels_of_channel_0_for_the_whole_image_fallback():
    """More than 9 mask pixels but at most 9 of them lit in channel 0: the whole image, whose crop is cut to
    the image's own non-black pixels (any channel) and whose box is the whole image."""
    from mediround.model.references import reference_from_masked_image

    image = _ct_like()
    image[0, 15] = (0, 90, 0)  # lit in channel 1 only: bounds the crop, not counted by the 9-pixel rule
    mask = np.zeros((12, 16), dtype=bool)
    mask[0:3, 0:16] = True  # 48 mask pixels, one lit (in channel 1)
    mask[3, 4:13] = True  # 9 more, 8 of them lit in channel 0 (column 12 is black)
    mask[4, 4] = True  # the 9th lit in channel 0
    reference = reference_from_masked_image(image, mask, box_max="inclusive")
    assert reference.whole_image
    np.testing.assert_allclose(reference.box, [0, 0, 15 / 16, 11 / 12])
    assert reference.crop.shape == (12, 12, 3)  # rows 0-8, columns 4-15
    np.testing.assert_array_equal(reference.crop[:9], image[0:9, 4:16])
    mask[4, 5] = True  # a 10th lit pixel: the mask decides
    assert not reference_from_masked_image(image, mask).whole_image


def test_masked_image_rule_keeps_the_ground_truth_reference_when_nothing_is_lit():
    """Where the authors' ``get_bbox`` fails (a black image), the referred round's ground-truth reference stays
    (cut by its mask, as in training); without the ground truth, the whole image."""
    from mediround.model.references import PredictedMask, reference_from_prediction

    black = np.zeros((12, 16, 3), dtype=np.uint8)
    predicted = np.zeros((12, 16), dtype=bool)
    predicted[2:8, 2:8] = True
    truth = np.zeros((12, 16), dtype=bool)
    truth[5:7, 9:15] = True
    kept = reference_from_prediction(black, PredictedMask(predicted, truth), "masked-image")
    expected = reference_from_mask(black, truth)
    np.testing.assert_array_equal(kept.box, expected.box)
    assert kept.crop.shape == expected.crop.shape == (6, 6, 3)
    whole = reference_from_prediction(black, PredictedMask(predicted), "masked-image")
    assert whole.whole_image and whole.crop.shape == (16, 16, 3)


def test_the_processor_cuts_predicted_masks_by_the_rule_and_ground_truth_by_the_mask():
    from mediround.model import build_model, preset
    from mediround.model.references import PredictedMask

    config = preset("tiny")
    config.heads.predicted_reference = "masked-image"
    processor = build_model(config, device="meta").processor
    image = _ct_like()
    mask = np.zeros((12, 16), dtype=bool)
    mask[1:6, 2:8] = True
    assert processor.reference(image, PredictedMask(mask)).crop.shape == (4, 4, 3)
    assert processor.reference(image, mask).crop.shape == (6, 6, 3)
