import numpy as np
import pytest
import torch
from PIL import Image

from mediround.data.dialogue import Dialogue, Round
from mediround.errors import DataError
from mediround.model.processor import BOX, CROP, IGNORE, IMAGE, ChatLayout, answer_with_seg, load_sample
from mediround.model.tokenizer import SEG_TOKEN, train_tiny_tokenizer


@pytest.fixture(scope="module")
def layout():
    return ChatLayout(train_tiny_tokenizer(500), image_tokens=4, crop_tokens=2, system_prompt="Be brief.")


def test_layout_places_image_reference_and_answer_tokens(layout):
    rounds = [Round("Find the liver.", "It is [SEG]."), Round("Segment the one below.", "Here [SEG].", ref=1)]
    piece, seg_positions = layout.dialogue(Dialogue(id="a", image="x.png", rounds=rounds))
    kinds = np.array(piece.kinds)
    assert (kinds == IMAGE).sum() == 4 and (kinds == CROP).sum() == 2 and (kinds == BOX).sum() == 1
    assert np.flatnonzero(kinds == IMAGE).max() < np.flatnonzero(kinds == CROP).min()  # crop in round 2's turn
    assert [piece.ids[p] for p in seg_positions] == [layout.seg_id, layout.seg_id]
    labelled = [i for i, flag in enumerate(piece.labelled) if flag]
    assert piece.ids.count(layout.eos_id) == 2 and piece.ids[labelled[-1]] == layout.eos_id
    # Labelled tokens are exactly the two answers: the text decodes back to them.
    answers = layout.tokenizer.decode([piece.ids[i] for i in labelled])
    assert answers.replace("</s>", "|") == " It is [SEG].| Here [SEG].|"
    assert IGNORE == -100
    # The same ids as the pieces an incremental pass feeds.
    incremental = layout.prefix().ids + layout.user(0, rounds[0].query, False).ids + layout.answer(rounds[0].answer).ids
    incremental += layout.user(1, rounds[1].query, True).ids + layout.answer(rounds[1].answer).ids
    assert incremental == piece.ids


def test_llava_mistral_template_is_the_authors_text_with_kinds_and_labels():
    """``mllm.chat_template: llava-mistral`` (the 7B preset): ``[INST] <image>\\n {q} [/INST] {a} </s>``."""
    layout = ChatLayout(train_tiny_tokenizer(500), image_tokens=4, crop_tokens=1, system_prompt="",
                        template="llava-mistral")
    rounds = [Round("Find the liver.", "It is [SEG]."), Round("Segment the one below.", "[SEG].", ref=1),
              Round("And the kidney?", "Here [SEG]")]
    piece, seg_positions = layout.dialogue(Dialogue(id="m", image="x.png", rounds=rounds))
    text = layout.tokenizer.decode(piece.ids, clean_up_tokenization_spaces=False)
    assert text == ("<s>[INST] <image><image><image><image>\n Find the liver. [/INST] It is [SEG]. </s>"
                    "[INST] [REF_CROP][REF_BOX] Segment the one below. [/INST] [SEG]. </s>"
                    "[INST] And the kidney? [/INST] Here [SEG] </s>")
    kinds = np.array(piece.kinds)
    assert (kinds == IMAGE).sum() == 4 and (kinds == CROP).sum() == 1 and (kinds == BOX).sum() == 1
    assert [piece.ids[p] for p in seg_positions] == [layout.seg_id] * 3
    labelled = [piece.ids[i] for i, flag in enumerate(piece.labelled) if flag]
    assert layout.tokenizer.decode(labelled, clean_up_tokenization_spaces=False) == (
        " It is [SEG]. </s> [SEG]. </s> Here [SEG] </s>")
    # Generation continues the user turn's ids: they start the teacher-forced round's.
    for index, round_ in enumerate(rounds):
        user = layout.round(index, round_.query, round_.ref is not None, None)[0]
        forced = layout.round(index, round_.query, round_.ref is not None, round_.answer)[0]
        assert forced.ids[: len(user.ids)] == user.ids and not any(forced.labelled[: len(user.ids)])


def test_answer_gets_exactly_one_seg(layout):
    assert answer_with_seg("It is the liver.") == f"It is the liver. {SEG_TOKEN}"
    rounds = [Round("q", "[SEG] and [SEG]")]
    with pytest.raises(DataError, match=r"rounds\[0\]\.answer"):
        layout.dialogue(Dialogue(id="b", image="x.png", rounds=rounds))


def test_load_sample_reads_image_and_masks(tmp_path):
    pixels = np.zeros((6, 8), dtype=np.uint8)
    pixels[1:3, 2:5] = 255
    Image.fromarray(np.full((6, 8), 90, dtype=np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(pixels).save(tmp_path / "m1.png")
    rounds = [Round("q1", "a [SEG]", mask="m1.png"), Round("q2", "b [SEG]", ref=1)]
    item = load_sample(Dialogue(id="c", image="img.png", rounds=rounds, root=tmp_path))
    assert item.image.shape == (6, 8, 3) and item.image.dtype == np.uint8 and item.image[0, 0, 2] == 90
    assert item.masks[0].sum() == 6 and item.masks[1] is None
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "m1.png")
    with pytest.raises(DataError, match="differs from image size"):
        load_sample(Dialogue(id="c", image="img.png", rounds=rounds, root=tmp_path))


@pytest.mark.parametrize("shape", [(37, 53, 3), (61, 29, 3), (40, 40, 3)])
def test_clip_processor_view_is_what_clip_image_processor_makes(shape):
    """``mllm.clip_view: clip-processor`` (the 7B preset): shortest side, centre crop, as transformers' PIL
    ``CLIPImageProcessor`` does for the authors' code; ``squash`` keeps the whole image instead."""
    from transformers import CLIPImageProcessorPil

    from mediround.model.mllm import clip_normalise, clip_processor_view

    image = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    expected = processor(image, return_tensors="pt")["pixel_values"]
    view = clip_processor_view(image, 24)
    assert view.shape == (1, 3, 24, 24)
    assert (view - expected).abs().max() <= 1e-5
    squashed = clip_normalise(torch.from_numpy(image).permute(2, 0, 1)[None].float(), 24)
    assert shape[0] == shape[1] or (squashed - expected).abs().max() > 0.1


def test_sam_pixels_resized_by_pil_are_segment_anythings_input():
    """``segmenter.resize: pil`` (the 7B preset): PIL's bilinear resize of the uint8 image to the longest
    side, as segment-anything's ``ResizeLongestSide.apply_image``, then mean/std and bottom-right padding."""
    from mediround.model.frame import SAM_MEAN, SAM_STD, ImageFrame

    image = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    frame = ImageFrame.of(image, 64)
    assert frame.resized == (45, 64)  # int(37 * 64 / 53 + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((64, 45), Image.BILINEAR), dtype=np.float32)
    expected = np.zeros((3, 64, 64), dtype=np.float32)
    expected[:, :45] = ((resized - SAM_MEAN) / SAM_STD).transpose(2, 0, 1)
    pixels = frame.pixels(image, "sam", resize="pil")
    np.testing.assert_allclose(pixels[0].numpy(), expected, atol=1e-5)
    assert (frame.pixels(image, "sam") - pixels).abs().max() > 1e-3  # the torch resize differs from it
