import torch
from model_fixtures import perturb_lora, sample, tiny_model

from mediround.model import DialogueSession


def test_incremental_rounds_equal_the_whole_dialogue_forward():
    torch.set_num_threads(2)
    model = tiny_model(seed=3)
    perturb_lora(model)
    model.eval()
    item = sample(4, seed=11)
    with torch.no_grad():
        whole = model(model.processor.collate([item, sample(2, seed=12)]))
        lora_off = model.mllm.disable_adapter()
        with lora_off:
            without_lora = model(model.processor.collate([item]))
    assert (whole.seg_features[0] - without_lora.seg_features[0]).abs().max() > 1e-3, "LoRA must matter"

    model.encoder_calls.clear()
    session = DialogueSession.for_image(model, item.image)
    features = []
    for round_ in item.dialogue.rounds:
        reference = None if round_.ref is None else item.masks[round_.ref - 1]
        features.append(session.step(round_.query, round_.answer, reference).seg_feature)
    features = torch.stack(features)
    assert (features - whole.seg_features[0]).abs().max() < 1e-4
    masks = session.decode(features)
    assert masks.shape == (4, 128, 128)
    assert (masks - whole.mask_logits[0]).abs().max() < 1e-4  # 128 px image: supervision frame == original
    # One SAM and one CLIP pass for the whole dialogue; the KV cache holds every token fed so far.
    assert model.encoder_calls == {"sam": 1, "clip": 1, "crop": 3}
    assert session.cache.get_seq_length() == session.length == int(whole_length(model, item))


def whole_length(model, item):
    return model.processor.collate([item]).attention_mask.sum()


def test_greedy_round_returns_a_feature_and_keeps_the_cache_consistent():
    torch.set_num_threads(2)
    model = tiny_model(seed=4).eval()
    item = sample(2, seed=13)
    session = DialogueSession.for_image(model, item.image)
    session.step(item.dialogue.rounds[0].query, item.dialogue.rounds[0].answer)
    output = session.step("Segment the next one.", None, item.masks[0], max_new_tokens=6)
    layout = model.processor.layout
    assert output.seg_feature.shape == (256,)
    assert output.answer_ids.count(layout.seg_id) == 1 and output.answer_ids[-1] == layout.eos_id
    assert len(output.answer_ids) <= 6 + 2
    assert session.cache.get_seq_length() == session.length
    # An untrained model rarely says [SEG] on its own: then [SEG] is fed and reported.
    if output.seg_fed:
        assert output.answer_ids[-2] == layout.seg_id
