"""The authors' conventions as config switches (heads.seg_state, heads.jcm_refine, mllm.system_prompt):
each changes what it should, and configs without the keys (old checkpoints) keep today's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import perturb_lora, sample

from mediround.errors import RecipeError
from mediround.model import DialogueSession, MediRoundConfig, build_model, preset
from mediround.model.jcm import JCM
from mediround.model.processor import BOX, CROP


def _model(**heads):
    config = preset("tiny")
    for key, value in heads.items():
        setattr(config.heads, key, value)
    torch.manual_seed(0)
    model = build_model(config)
    perturb_lora(model)
    return model.eval()


def test_seg_state_before_seg_takes_the_state_that_emits_seg():
    torch.set_num_threads(2)
    model = _model(seg_state="before_seg")
    item = sample(3, seed=5)
    batch = model.processor.collate([item])
    with torch.no_grad():
        output = model(batch)
        embeds = model.embed(batch.input_ids, batch.kinds, model.clip_features(batch.clip_pixels), batch.crop_pixels,
                             batch.boxes)
        hidden = model.hidden_states(embeds, batch.attention_mask, None)[0]
        positions = batch.seg_positions[0]
        before = model.project(hidden[[p - 1 for p in positions]])
        at = model.project(hidden[positions])
    assert torch.allclose(output.seg_features[0], before, atol=1e-5)
    assert (output.seg_features[0] - at).abs().max() > 1e-3
    # Round by round over the KV cache gives the same h_c as the whole-dialogue forward.
    session = DialogueSession.for_image(model, item.image)
    for index, round_ in enumerate(item.dialogue.rounds):
        reference = None if round_.ref is None else item.masks[round_.ref - 1]
        feature = session.step(round_.query, round_.answer, reference).seg_feature
        assert torch.allclose(feature, before[index], atol=1e-4)


def test_greedy_rounds_take_h_c_from_the_configured_state():
    torch.set_num_threads(2)
    model = _model(seg_state="before_seg")
    item = sample(1, seed=6)
    session = DialogueSession.for_image(model, item.image)
    result = session.step(item.dialogue.rounds[0].query, None, max_new_tokens=3)
    # Feed the generated answer teacher-forced in a fresh session: the same ids give the same h_c.
    answer = model.tokenizer.decode(result.answer_ids[:-1], skip_special_tokens=False)
    replay = DialogueSession.for_image(model, item.image)
    layout = model.processor.layout
    assert layout.answer(answer).ids == result.answer_ids  # this seed's three tokens round-trip through text
    assert result.seg_fed  # three tokens without [SEG]: [SEG] is fed, h_c is the state of the last token before it
    assert torch.allclose(replay.step(item.dialogue.rounds[0].query, answer).seg_feature, result.seg_feature,
                          atol=1e-4)


def test_refine_direct_outputs_the_mlp_residual_starts_as_identity():
    torch.manual_seed(0)
    features = torch.randn(3, 16)
    residual, direct = JCM(16, 32, residual=True), JCM(16, 32, residual=False)
    assert torch.equal(residual.refine(features), features)
    assert torch.allclose(direct.refine(features), direct.refine_mlp(features))
    assert direct.refine_mlp[-1].weight.abs().sum() > 0
    assert _model(jcm_refine="direct").jcm.residual is False
    assert _model().jcm.residual is True


def test_system_prompt_empty_leaves_only_the_user_turn_in_the_prefix():
    with_prompt, without = _model(), preset("tiny")
    without.mllm.system_prompt = ""
    layout = build_model(without).processor.layout
    prompt_ids = layout.text(with_prompt.config.mllm.system_prompt)
    assert len(with_prompt.processor.layout.prefix().ids) == len(layout.prefix().ids) + len(prompt_ids)


def test_7b_preset_turns_the_authors_conventions_on_and_tiny_keeps_todays():
    big = preset("llava-med-7b", mllm_path="weights/llava", sam_checkpoint=None)
    assert (big.heads.seg_state, big.heads.jcm_refine, big.heads.jcm_rounds) == ("before_seg", "direct", "referred")
    assert big.mllm.system_prompt == ""
    assert (big.heads.box_max, preset("tiny").heads.box_max) == ("inclusive", "exclusive")
    assert (big.mllm.chat_template, preset("tiny").mllm.chat_template) == ("llava-mistral", "spaced")
    assert (big.mllm.clip_view, preset("tiny").mllm.clip_view) == ("clip-processor", "squash")
    assert (big.segmenter.resize, preset("tiny").segmenter.resize) == ("pil", "torch")
    assert (big.heads.judge_iou, preset("tiny").heads.judge_iou) == ("original", "resized")
    assert (big.heads.mask_loss_frame, preset("tiny").heads.mask_loss_frame) == ("original", "resized")
    assert (big.heads.dice_smoothing, preset("tiny").heads.dice_smoothing) == (1e-3, 1.0)
    assert (big.heads.predicted_reference, preset("tiny").heads.predicted_reference) == ("masked-image", "mask")
    tiny = preset("tiny")
    assert (tiny.heads.seg_state, tiny.heads.jcm_refine, tiny.heads.jcm_rounds) == ("at_seg", "residual", "all")
    # The paper's reference rule in both presets: only the tiny recipes turn the stray-fragment rule on.
    assert big.heads.reference_min_fragment == tiny.heads.reference_min_fragment == 0.0


def test_a_config_without_the_keys_loads_with_todays_behaviour():
    data = preset("tiny").to_dict()
    for key in ("seg_state", "jcm_refine", "jcm_rounds", "reference_min_fragment", "box_max", "judge_iou",
                "mask_loss_frame", "dice_smoothing", "predicted_reference"):
        del data["heads"][key]
    del data["mllm"]["chat_template"], data["mllm"]["clip_view"], data["segmenter"]["resize"]
    config = MediRoundConfig.from_dict(data)
    assert config.segmenter.resize == "torch" and config.heads.judge_iou == "resized"
    assert config.heads.box_max == "exclusive" and config.mllm.chat_template == "spaced"
    assert (config.heads.mask_loss_frame, config.heads.predicted_reference) == ("resized", "mask")
    assert config.heads.dice_smoothing == 1.0
    assert config.mllm.clip_view == "squash"
    assert (config.heads.seg_state, config.heads.jcm_refine, config.heads.jcm_rounds) == ("at_seg", "residual", "all")
    assert config.heads.reference_min_fragment == 0.0


def test_an_unknown_convention_is_one_line_naming_the_field():
    config = preset("tiny")
    config.heads.seg_state = "after_seg"
    with pytest.raises(Exception, match="heads.seg_state"):
        config.validate()


@pytest.mark.parametrize("kept", ["crop", "box"])
def test_reference_tokens_ablation_keeps_only_the_named_token(kept):
    """heads.reference_tokens drops the other reference token from the sequence; the kept one still carries
    the referenced mask (its feature changes with the mask), in training and round by round alike."""
    torch.set_num_threads(2)
    full, ablated = _model(), _model(reference_tokens=kept)
    item = sample(3, seed=5)
    full_kinds = full.processor.collate([item]).kinds[0].tolist()
    ablated_batch = ablated.processor.collate([item])
    kinds = ablated_batch.kinds[0].tolist()
    references = sum(r.ref is not None for r in item.dialogue.rounds)
    dropped, kept_kind = (BOX, CROP) if kept == "crop" else (CROP, BOX)
    assert references >= 1 and kinds.count(dropped) == 0
    assert kinds.count(kept_kind) == full_kinds.count(kept_kind) and len(kinds) == len(full_kinds) - full_kinds.count(dropped)
    with torch.no_grad():
        output = ablated(ablated_batch)
    session = DialogueSession.for_image(ablated, item.image)
    index = next(i for i, r in enumerate(item.dialogue.rounds) if r.ref is not None)
    for before in item.dialogue.rounds[:index]:
        session.step(before.query, before.answer, None if before.ref is None else item.masks[before.ref - 1])
    round_ = item.dialogue.rounds[index]
    true_feature = session.fork().step(round_.query, round_.answer, item.masks[round_.ref - 1]).seg_feature
    assert torch.allclose(true_feature, output.seg_features[0][index], atol=1e-4)
    moved = np.zeros_like(item.masks[round_.ref - 1])
    moved[:8, :8] = 1
    other_feature = session.step(round_.query, round_.answer, moved).seg_feature
    assert (other_feature - true_feature).abs().max() > 1e-4


def test_reference_min_fragment_reaches_training_and_chained_references():
    """``heads.reference_min_fragment`` is applied wherever a reference is built: the training batch and the
    round-by-round session see the clean reference of a mask with a stray pixel; the paper's default does not."""
    torch.set_num_threads(2)
    item = sample(3, seed=5)
    index = next(i for i, r in enumerate(item.dialogue.rounds) if r.ref is not None)
    round_ = item.dialogue.rounds[index]
    clean = item.masks[round_.ref - 1]
    stray = np.array(clean, dtype=bool)
    corner = (0, 0) if not stray[:4, :4].any() else (-1, -1)
    assert not stray[:4, :4].any() or not stray[-4:, -4:].any()  # an isolated pixel in an empty corner
    stray[corner] = True

    def features(model):
        session = DialogueSession.for_image(model, item.image)
        for before in item.dialogue.rounds[:index]:
            session.step(before.query, before.answer, None if before.ref is None else item.masks[before.ref - 1])
        return [session.fork().step(round_.query, round_.answer, mask).seg_feature for mask in (clean, stray)]

    cleaning, paper = _model(reference_min_fragment=0.1), _model()
    with_clean, with_stray = features(cleaning)
    assert torch.equal(with_clean, with_stray)
    paper_clean, paper_stray = features(paper)
    assert (paper_clean - paper_stray).abs().max() > 1e-4
    boxes = cleaning.processor.collate([item]).boxes
    swapped = sample(3, seed=5)
    swapped.reference_masks[index] = stray
    np.testing.assert_array_equal(cleaning.processor.collate([swapped]).boxes, boxes)
    assert not torch.equal(paper.processor.collate([swapped]).boxes, boxes)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_reference_min_fragment_outside_0_1_is_refused(value):
    config = preset("tiny")
    config.heads.reference_min_fragment = value
    with pytest.raises(RecipeError, match="heads.reference_min_fragment"):
        config.validate()


def test_reference_tokens_refuses_an_unknown_value():
    config = preset("tiny")
    config.heads.reference_tokens = "mask"
    with pytest.raises(RecipeError, match="heads.reference_tokens"):
        config.validate()
