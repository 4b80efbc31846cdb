import numpy as np
import torch
from model_fixtures import quadrant_sample, sample, tiny_model

from mediround.model import MASK_THRESHOLD, build_model, preset
from mediround.model.build import DTYPES


def test_teacher_forced_batch_of_different_lengths():
    torch.set_num_threads(2)
    model = tiny_model()
    batch = model.processor.collate([sample(1, seed=0), sample(3, seed=1), sample(5, seed=2)])
    assert batch.attention_mask.sum(1).tolist()[0] < batch.attention_mask.sum(1).tolist()[2]
    assert batch.crop_pixels.shape[0] == 0 + 2 + 4  # one crop per referring round
    output = model(batch)
    assert [f.shape for f in output.seg_features] == [(1, 256), (3, 256), (5, 256)]
    assert [m.shape for m in output.mask_logits] == [(1, 128, 128), (3, 128, 128), (5, 128, 128)]
    for value in [output.loss, *output.losses.values()]:
        assert torch.isfinite(value)
    weights = model.config.loss
    expected = weights.ce * output.losses["ce"] + weights.bce * output.losses["bce"] + weights.dice * output.losses["dice"]
    torch.testing.assert_close(output.loss, expected)
    # SAM and CLIP encode each image exactly once; crops once per referring round.
    assert model.encoder_calls == {"sam": 3, "clip": 3, "crop": 6}
    output.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained, "no gradients at all"
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []
    assert any("lora_B" in n for n in trained)  # lora_A gets gradient once B is non-zero
    assert any(n.startswith("sam.mask_decoder.") for n in trained)
    assert any(n.startswith("box_encoder.") for n in trained)
    assert not any(n.startswith(("sam.image_encoder", "sam.prompt_encoder")) for n in trained)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trained)
    assert not any("iou_prediction_head" in n for n in trained)


def test_padding_does_not_change_a_dialogue():
    torch.set_num_threads(2)
    model = tiny_model().eval()
    with torch.no_grad():
        alone = model(model.processor.collate([sample(2, seed=3)]))
        padded = model(model.processor.collate([sample(2, seed=3), sample(5, seed=4)]))
    torch.testing.assert_close(alone.seg_features[0], padded.seg_features[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.mask_logits[0], padded.mask_logits[0], atol=1e-4, rtol=0)


def test_a_fixed_batch_can_be_overfit():
    """Two images whose one structure sits in different quadrants: a few AdamW steps on the default
    trainable split must take Dice above 0.9. (Telling apart rounds of one image from the text alone takes
    hundreds of steps on the random tiny LM: tiny-learning.md.)"""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model()
    batch = model.processor.collate([quadrant_sample(0, seed=5), quadrant_sample(3, seed=6)])
    targets = torch.cat(batch.target_masks).bool()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        output = model(batch)
        losses.append(float(output.loss))
        optimiser.zero_grad()
        output.loss.backward()
        optimiser.step()
    with torch.no_grad():
        output = model(batch)
    predicted = torch.cat(output.mask_logits) > MASK_THRESHOLD
    dice = 2 * (predicted & targets).flatten(1).sum(1) / (predicted.flatten(1).sum(1) + targets.flatten(1).sum(1))
    assert float(output.loss) < losses[0] / 2
    assert float(dice.min()) > 0.9, f"Dice {dice.tolist()}"


def test_mask_targets_follow_the_resized_frame():
    model = tiny_model()
    wide = sample(1, seed=8)
    wide.image = np.zeros((64, 256, 3), dtype=np.uint8)
    wide.masks = [np.zeros((64, 256), dtype=bool)]
    wide.masks[0][:, :128] = True
    batch = model.processor.collate([wide])
    assert [frame.resized for frame in batch.frames] == [(32, 128)]
    assert batch.target_masks[0].shape == (1, 32, 128)
    assert batch.target_masks[0][0, :, :64].all() and not batch.target_masks[0][0, :, 64:].any()


def test_bf16_with_gradient_checkpointing_trains_and_matches_fp32_closely():
    torch.set_num_threads(1)
    outputs = {}
    for precision in ("fp32", "bf16"):
        config = preset("tiny")
        config.precision, config.gradient_checkpointing = precision, True
        model = build_model(config)
        assert model.llava.get_input_embeddings().weight.dtype == DTYPES[precision]
        assert model.sam.mask_decoder.output_upscaling[0].weight.dtype == torch.float32
        output = model(model.processor.collate([sample(2, seed=9)]))
        output.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n)
        outputs[precision] = {k: float(v) for k, v in output.losses.items()}
    for name in ("ce", "bce", "dice"):
        assert abs(outputs["bf16"][name] - outputs["fp32"][name]) < 0.05 * max(1.0, outputs["fp32"][name])


def test_mask_losses_at_the_original_size_compare_original_logits_with_the_ground_truth_as_it_is():
    """``heads.mask_loss_frame: original`` (the 7B preset, the authors' ``postprocess_masks``): the targets
    are the ground-truth masks at the image's size, the logits are what inference returns there, and the
    losses are BCE and Dice of those; ``resized`` keeps both in SAM's resized frame."""
    from mediround.model.losses import mask_losses

    torch.set_num_threads(2)
    model = tiny_model()
    wide = sample(1, seed=8)
    wide.image = np.random.default_rng(3).integers(0, 255, (64, 200, 3), dtype=np.uint8)
    wide.masks = [np.zeros((64, 200), dtype=bool)]
    wide.masks[0][10:40, 30:120] = True
    resized = model(model.processor.collate([wide]))
    model.config.heads.mask_loss_frame = "original"
    model.processor.mask_loss_frame = "original"
    batch = model.processor.collate([wide])
    assert batch.target_masks[0].shape == (1, 64, 200)
    assert torch.equal(batch.target_masks[0][0].bool(), torch.from_numpy(wide.masks[0]))
    original = model(batch)
    frame = batch.frames[0]
    assert original.mask_logits[0].shape == (1, 64, 200)
    torch.testing.assert_close(original.mask_logits[0], frame.to_original(resized.mask_logits[0]))
    bce, dice = mask_losses(list(original.mask_logits[0]), list(batch.target_masks[0]))
    torch.testing.assert_close((original.losses["bce"], original.losses["dice"]), (bce, dice))
    assert abs(float(original.losses["bce"]) - float(resized.losses["bce"])) > 1e-6


def test_the_image_placeholder_is_never_a_target_nor_generated():
    """``<image>`` marks where image features go: its logit is -inf in the loss and in greedy decoding, so the
    answer CE is a softmax over the other tokens (the authors' LLaVA has no such row)."""
    torch.set_num_threads(2)
    model = tiny_model()
    image_id = model.processor.layout.image_id
    hidden = torch.randn(5, model.llava.config.text_config.hidden_size)
    with torch.no_grad():
        logits = model.answer_logits(hidden)
        raw = model.llava.lm_head(hidden)
    assert torch.isneginf(logits[:, image_id]).all()
    others = [i for i in range(raw.shape[-1]) if i != image_id]
    torch.testing.assert_close(logits[:, others], raw[:, others])
    labels = torch.tensor(others[:5])
    kept = torch.nn.functional.cross_entropy(raw[:, others], torch.tensor([others.index(int(i)) for i in labels]))
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, labels), kept)


def test_dice_smoothing_is_the_term_added_to_both_sides_of_the_soft_dice():
    """``heads.dice_smoothing``: 1 - (2 I + s) / (P + G + s); the authors' scaled form, sums / 1000 with eps 1e-6,
    is s = 0.001 (the 7B preset)."""
    from mediround.model.losses import dice_loss

    logits = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(1))
    targets = (torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    probs = torch.sigmoid(logits).flatten(1)
    flat = targets.flatten(1)
    scaled = 1 - (2 * (probs / 1000 * flat).sum(-1) + 1e-6) / ((probs / 1000).sum(-1) + (flat / 1000).sum(-1) + 1e-6)
    torch.testing.assert_close(dice_loss(logits, targets, 1e-3), scaled.mean())
    default = 1 - (2 * (probs * flat).sum(-1) + 1) / (probs.sum(-1) + flat.sum(-1) + 1)
    torch.testing.assert_close(dice_loss(logits, targets), default.mean())
