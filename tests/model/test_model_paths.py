"""Build MediRound from weight PATHS, the way a user does: a SAM ViT-B .pth (MedSAM format) and an HF
LLaVA folder; then round-trip a MediRound checkpoint made on them."""

import torch
from model_fixtures import outputs_in_fresh_process, perturb_lora, sample
from transformers import LlavaForConditionalGeneration

from mediround.model import build_model, preset
from mediround.model.checkpoint import save_checkpoint
from mediround.model.mllm import tiny_llava_config
from mediround.model.segmenter import build_sam
from mediround.model.tokenizer import train_tiny_tokenizer

SAM_SIZE = 64  # the real ViT-B key layout; a small input size keeps pos_embed/rel_pos (and the test) small


def write_weights(tmp_path):
    config = preset("tiny")
    config.segmenter.variant, config.segmenter.image_size = "vit_b", SAM_SIZE
    sam = build_sam(config.segmenter, "meta")
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in sam.state_dict().items()}
    torch.save(state, tmp_path / "medsam_vit_b.pth")
    tokenizer = train_tiny_tokenizer(500, with_mediround_tokens=False)
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(tiny_llava_config(config, tokenizer))
    llava.save_pretrained(tmp_path / "llava")
    tokenizer.save_pretrained(tmp_path / "llava")
    return state, llava, len(tokenizer)


def test_build_from_paths_and_round_trip(tmp_path):
    torch.set_num_threads(2)
    sam_state, llava, vocab = write_weights(tmp_path)
    assert "image_encoder.blocks.11.attn.rel_pos_h" in sam_state and len(sam_state) > 200
    config = preset("tiny")
    config.mllm.source = str(tmp_path / "llava")
    config.segmenter.variant = "vit_b"
    config.segmenter.image_size = SAM_SIZE
    config.segmenter.checkpoint = str(tmp_path / "medsam_vit_b.pth")
    model = build_model(config)
    assert model.base_vocab == vocab and len(model.tokenizer) == vocab + 3
    torch.testing.assert_close(model.sam.image_encoder.pos_embed, sam_state["image_encoder.pos_embed"])
    layer = "model.language_model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(model.llava.state_dict()[layer], llava.state_dict()[layer])
    perturb_lora(model)
    model.eval()
    item = sample(2, seed=31)
    with torch.no_grad():
        expected = model(model.processor.collate([item]))
    assert expected.mask_logits[0].shape == (2, SAM_SIZE, SAM_SIZE)
    save_checkpoint(model, tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "token_rows.safetensors" in names and not names & {"base_llava.safetensors", "base_sam.safetensors"}
    again = outputs_in_fresh_process(tmp_path / "ckpt", tmp_path, sample_rounds=2, sample_seed=31)
    torch.testing.assert_close(again["features"], expected.seg_features[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(again["masks"], expected.mask_logits[0], atol=1e-5, rtol=0)
