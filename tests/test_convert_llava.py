"""convert-llava: a tiny original-layout LLaVA-Med checkpoint converted to HF must compute what the original computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from mediround.convert import ConvertLlavaConfig, convert_llava
from mediround.errors import CheckpointError
from mediround_cli.main import cli

TOWER_HIDDEN = 16
TEXT_HIDDEN = 32
IMAGE_SIZE = 56
PATCH = 14
PATCHES = (IMAGE_SIZE // PATCH) ** 2
ROPE_THETA = 500000.0
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "sliding_window",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
)


def _tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["the liver lies under the right lung", "segment the left kidney", "where is the lesion"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_tower(folder: Path) -> None:
    torch.manual_seed(1)
    config = CLIPConfig(
        vision_config={
            "hidden_size": TOWER_HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
        },
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 50,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)


def _original_state(vocab: int) -> tuple[dict, dict]:
    """An original-layout LLaVA-Mistral state dict and its config.json (mirrors llava-med-v1.5-mistral-7b's fields)."""
    torch.manual_seed(0)
    text = {
        "vocab_size": vocab,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": ROPE_THETA,
        "sliding_window": None,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
    }
    state = dict(MistralForCausalLM(MistralConfig(**text)).state_dict())
    state["model.mm_projector.0.weight"] = torch.randn(TEXT_HIDDEN, TOWER_HIDDEN) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(TEXT_HIDDEN) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(TEXT_HIDDEN, TEXT_HIDDEN) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(TEXT_HIDDEN) * 0.1
    config = dict(
        text,
        architectures=["LlavaMistralForCausalLM"],
        model_type="llava_mistral",
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        mm_hidden_size=TOWER_HIDDEN,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tune_mm_mlp_adapter=False,
        use_mm_proj=True,
        torch_dtype="float32",
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        use_cache=False,
    )
    return {key: value.detach().clone() for key, value in state.items()}, config


def _write_source(folder: Path, state: dict, config: dict, tokenizer, fmt: str = "safetensors") -> None:
    """Two shards plus an index, in safetensors or torch .bin form."""
    folder.mkdir(parents=True)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    extension = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, half in enumerate(halves, start=1):
        name = f"{stem}-{number:05d}-of-00002.{extension}"
        part = {key: state[key] for key in half}
        if fmt == "safetensors":
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update({key: name for key in half})
    (folder / f"{stem}.{extension}.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llava")
    tokenizer = _tokenizer()
    state, config = _original_state(len(tokenizer))
    tower = root / "clip"
    _write_tower(tower)
    source = root / "llava-med"
    _write_source(source, state, config, tokenizer)
    return {
        "root": root,
        "source": source,
        "tower": tower,
        "state": state,
        "config": config,
        "tokenizer": tokenizer,
    }


def _reference_logits(
    state: dict, config: dict, tower: Path, pixels: torch.Tensor, before: list[int], after: list[int]
) -> torch.Tensor:
    """The original LLaVA computation, by hand: CLIP -> hidden_states[-2] -> drop CLS -> MLP -> splice -> Mistral."""
    clip_state = load_file(str(tower / "model.safetensors"))
    vision = CLIPVisionModel(CLIPConfig.from_pretrained(tower).vision_config).eval()
    vision.load_state_dict(
        {k[len("vision_model.") :]: v for k, v in clip_state.items() if k.startswith("vision_model.")}
    )
    language = MistralForCausalLM(MistralConfig(**{k: config[k] for k in TEXT_FIELDS})).eval()
    language.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.mm_projector.")})
    with torch.no_grad():
        patches = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = F.linear(patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
        image = F.linear(
            F.gelu(hidden), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"]
        )
        embed = language.get_input_embeddings()
        rows = torch.cat([embed(torch.tensor([before])), image, embed(torch.tensor([after]))], dim=1)
        return language(inputs_embeds=rows).logits


def _assert_same_computation(output: Path, checkpoint: dict) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    image_id = model.config.image_token_index
    vocab = checkpoint["config"]["vocab_size"]
    assert image_id == vocab == processor.tokenizer.convert_tokens_to_ids("<image>")
    before = checkpoint["tokenizer"].encode("segment the")
    after = checkpoint["tokenizer"].encode(" left kidney")
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    ids = torch.tensor([before + [image_id] * PATCHES + after])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    reference = _reference_logits(
        checkpoint["state"], checkpoint["config"], checkpoint["tower"], pixels, before, after
    )
    assert logits.shape[-1] == vocab + 1
    torch.testing.assert_close(logits[..., :vocab], reference, atol=1e-5, rtol=0)
    # The added <image> row of lm_head is the mean row, so its logit is the mean of the original logits.
    torch.testing.assert_close(logits[..., vocab], reference.mean(-1), atol=1e-5, rtol=0)


def test_converted_model_matches_original_computation(checkpoint, tmp_path):
    output = tmp_path / "hf"
    report = convert_llava(
        ConvertLlavaConfig(
            checkpoint["source"], output, vision_tower=checkpoint["tower"], max_shard_bytes=40_000
        )
    )
    config = json.loads((output / "config.json").read_text())
    assert config["image_seq_length"] == PATCHES == 16
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["text_config"]["model_type"] == "mistral"
    assert config["text_config"]["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert config["text_config"]["num_key_value_heads"] == 2
    assert config["text_config"].get("use_cache", True) is True  # the source says false (a training setting)
    assert report.image_token_added and report.missing == [] and report.unexpected == []
    assert len(report.shard_files) > 1 and (output / "model.safetensors.index.json").is_file()
    assert report.source_tensors == len(checkpoint["state"])
    assert any(name.endswith("text_projection.weight") for name in report.dropped)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    _assert_same_computation(output, checkpoint)


def test_processor_pads_to_square_and_expands_image_tokens(checkpoint, tmp_path):
    output = tmp_path / "hf"
    convert_llava(ConvertLlavaConfig(checkpoint["source"], output, vision_tower=checkpoint["tower"]))
    processor = AutoProcessor.from_pretrained(output)
    wide = torch.zeros(3, 20, 80, dtype=torch.uint8)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where is the lesion"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>[INST] <image>\nwhere is the lesion [/INST]"
    inputs = processor(images=wide, text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == PATCHES
    # LLaVA's expand2square pads with int(mean * 255); normalised, a pad pixel is (int(mean*255)/255 - mean) / std.
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    pad_value = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(mean, std)])
    torch.testing.assert_close(inputs["pixel_values"][0, :, 0, 0], pad_value, atol=1e-4, rtol=0)
    black = torch.tensor([-m / s for m, s in zip(mean, std)])
    torch.testing.assert_close(
        inputs["pixel_values"][0, :, IMAGE_SIZE // 2, IMAGE_SIZE // 2], black, atol=1e-4, rtol=0
    )


def test_bin_shards_convert_to_the_same_model(checkpoint, tmp_path):
    source = tmp_path / "bin-source"
    _write_source(source, checkpoint["state"], checkpoint["config"], checkpoint["tokenizer"], fmt="bin")
    output = tmp_path / "hf"
    report = convert_llava(ConvertLlavaConfig(source, output, vision_tower=checkpoint["tower"]))
    assert report.shard_files == ["model.safetensors"]
    _assert_same_computation(output, checkpoint)


def test_tower_embedded_in_source_is_used(checkpoint, tmp_path):
    state = dict(checkpoint["state"])
    clip_state = load_file(str(checkpoint["tower"] / "model.safetensors"))
    for key, value in clip_state.items():
        if key.startswith("vision_model."):
            state["model.vision_tower.vision_tower." + key] = value
    source = tmp_path / "embedded"
    _write_source(source, state, checkpoint["config"], checkpoint["tokenizer"])
    config_only = tmp_path / "clip-config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((checkpoint["tower"] / "config.json").read_text())
    report = convert_llava(ConvertLlavaConfig(source, tmp_path / "hf", vision_tower=config_only))
    assert report.vision_weights_from == str(source)
    _assert_same_computation(tmp_path / "hf", checkpoint)


def test_missing_source_tensor_fails_naming_it(checkpoint, tmp_path):
    state = {k: v for k, v in checkpoint["state"].items() if k != "model.layers.1.mlp.down_proj.weight"}
    source = tmp_path / "partial"
    _write_source(source, state, checkpoint["config"], checkpoint["tokenizer"])
    with pytest.raises(
        CheckpointError,
        match=r"1 missing target tensors: model\.language_model\.layers\.1\.mlp\.down_proj\.weight",
    ):
        convert_llava(ConvertLlavaConfig(source, tmp_path / "hf", vision_tower=checkpoint["tower"]))
    assert not (tmp_path / "hf").exists()
    report = convert_llava(
        ConvertLlavaConfig(source, tmp_path / "hf", vision_tower=checkpoint["tower"], allow_partial_load=True)
    )
    assert report.missing == ["model.language_model.layers.1.mlp.down_proj.weight"]


def test_unexpected_source_tensor_fails_naming_it(checkpoint, tmp_path):
    state = dict(
        checkpoint["state"], **{"model.mm_projector.4.weight": torch.zeros(TEXT_HIDDEN, TEXT_HIDDEN)}
    )
    source = tmp_path / "extra"
    _write_source(source, state, checkpoint["config"], checkpoint["tokenizer"])
    with pytest.raises(CheckpointError, match=r"1 unexpected source tensors: model\.mm_projector\.4\.weight"):
        convert_llava(ConvertLlavaConfig(source, tmp_path / "hf", vision_tower=checkpoint["tower"]))


def test_hub_name_vision_tower_fails_with_download_instructions(checkpoint, tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"'openai/clip-vit-large-patch14-336' is not a local folder.*huggingface-cli download",
    ):
        convert_llava(ConvertLlavaConfig(checkpoint["source"], tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_unmerged_lora_is_refused(checkpoint, tmp_path):
    source = tmp_path / "lora"
    _write_source(source, checkpoint["state"], checkpoint["config"], checkpoint["tokenizer"])
    (source / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="unmerged LoRA adapter"):
        convert_llava(ConvertLlavaConfig(source, tmp_path / "hf", vision_tower=checkpoint["tower"]))
    lora_key = "model.layers.0.self_attn.q_proj.lora_A.weight"
    state = dict(checkpoint["state"], **{lora_key: torch.zeros(8, TEXT_HIDDEN)})
    merged_badly = tmp_path / "lora-tensors"
    _write_source(merged_badly, state, checkpoint["config"], checkpoint["tokenizer"])
    with pytest.raises(CheckpointError, match=rf"1 unmerged LoRA tensors \(e\.g\. {lora_key}\)"):
        convert_llava(ConvertLlavaConfig(merged_badly, tmp_path / "hf", vision_tower=checkpoint["tower"]))


def test_cli_converts_and_refuses_with_one_line(checkpoint, tmp_path):
    runner = CliRunner()
    output = tmp_path / "hf"
    result = runner.invoke(
        cli,
        ["convert-llava", str(checkpoint["source"]), str(output), "--vision-tower", str(checkpoint["tower"])],
    )
    assert result.exit_code == 0, result.output
    assert (output / "model.safetensors").is_file() and (output / "conversion_report.json").is_file()
    again = runner.invoke(
        cli,
        ["convert-llava", str(checkpoint["source"]), str(output), "--vision-tower", str(checkpoint["tower"])],
    )
    assert again.exit_code == 2
    assert "already exists" in again.output and "Traceback" not in again.output


def test_sentencepiece_tokenizer_without_its_reader_is_refused(checkpoint, tmp_path, monkeypatch):
    source = tmp_path / "spm"
    _write_source(source, checkpoint["state"], checkpoint["config"], checkpoint["tokenizer"])
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.model").write_bytes(b"\x0a\x00")
    monkeypatch.setattr("mediround.convert.llava._importable", lambda module: module != "sentencepiece")
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.model: reading a SentencePiece tokenizer needs sentencepiece"
    ):
        convert_llava(ConvertLlavaConfig(source, tmp_path / "hf", vision_tower=checkpoint["tower"]))


# llava-med-v1.5-mistral-7b's config.json fields as published (transcribed, not read from the hub here).
LLAVA_MED_7B = {
    "architectures": ["LlavaMistralForCausalLM"],
    "model_type": "llava_mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "image_aspect_ratio": "pad",
    "torch_dtype": "bfloat16",
    "use_cache": False,
}


def test_full_size_llava_med_layout_maps_every_tensor_on_meta():
    """The 7B + ViT-L/14-336 key sets (built on the meta device) map one to one, with matching shapes."""
    from transformers import CLIPVisionConfig

    from mediround.convert.llava import _plan, _target_shapes, _text_config, _WeightFile, llava_config_for

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = _text_config(LLAVA_MED_7B)
    text.vocab_size = 32001
    config = llava_config_for(LLAVA_MED_7B, text, vision, image_token_index=32000)
    assert config.image_seq_length == 576 and config.text_config.rope_parameters["rope_theta"] == 1e6
    targets = _target_shapes(config)
    with torch.device("meta"):
        language = MistralForCausalLM(
            MistralConfig(**{k: LLAVA_MED_7B[k] for k in TEXT_FIELDS if k in LLAVA_MED_7B})
        )
        clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config={"hidden_size": 768}))
    source = {k: v.shape for k, v in language.state_dict().items()}
    source.update(
        {
            "model.mm_projector.0.weight": (4096, 1024),
            "model.mm_projector.0.bias": (4096,),
            "model.mm_projector.2.weight": (4096, 4096),
            "model.mm_projector.2.bias": (4096,),
        }
    )
    tower = {k: v.shape for k, v in clip.state_dict().items()}
    plan = _plan(
        [_WeightFile(Path("src.safetensors"), list(source))],
        [_WeightFile(Path("clip.bin"), list(tower))],
        targets,
    )
    assert plan.missing == [] and plan.unexpected == []
    # text 3 + 32 layers x 9, projector 4, CLIP 7 + 24 layers x 16
    assert len(plan.moves) == len(targets) == 3 + 32 * 9 + 4 + 7 + 24 * 16 == 686
    for file, key, target in plan.moves:
        shape = tuple((source if file.path.name == "src.safetensors" else tower)[key])
        grown = (32001, 4096) if shape == (32000, 4096) else shape
        assert grown == tuple(targets[target]), key
