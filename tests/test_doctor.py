"""``mediround doctor``: real checks on real files (tiny recipe, SAM .pth, LLaVA folders, data, memory fit)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_convert_llava import _original_state, _tokenizer, _write_source, _write_tower

from mediround.convert import ConvertLlavaConfig, convert_llava
from mediround.data.formats import load_dialogues
from mediround.data.synth import generate
from mediround.doctor import FAIL, OK, WARN, DoctorConfig, run_doctor
from mediround.doctor.files import sample_indices
from mediround.doctor.memory import (
    USABLE_FRACTION,
    check_memory,
    longest_sequence,
    measure_model,
    shard_for_zero,
    zero_stage,
)
from mediround.doctor.stack import GpuInfo, in_range
from mediround.doctor.weights import check_llava, check_sam, read_safetensors_header
from mediround.model.build import build_model
from mediround.model.config import MediRoundConfig, tiny_config
from mediround.model.memory import DEFAULT_SEQUENCE_LENGTH, GIB, estimate_from_sizes, estimate_training_memory
from mediround.model.mllm import tiny_llava_config
from mediround.model.segmenter import build_sam
from mediround.model.stand_in import write_stand_in_folder
from mediround.model.tokenizer import MEDIROUND_TOKENS, train_tiny_tokenizer
from mediround.training.recipe import SHIPPED_RECIPES, load_recipe
from mediround_cli import doctor as doctor_cli
from mediround_cli.main import cli

RECIPES = SHIPPED_RECIPES
TINY_RECIPE = str(RECIPES / "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    generate(folder, 20, seed=0)
    return folder


@pytest.fixture
def wide_console(monkeypatch):
    """Table cells must not fold file names and keys across lines in the captured output."""
    monkeypatch.setattr(doctor_cli.console, "width", 2000)


def tiny_overrides(synth: Path, output: Path, *extra: str) -> list[str]:
    return [f"data.train={synth / 'train.jsonl'}", f"data.val={synth / 'val.jsonl'}", f"output={output}", *extra]


def rows_by_name(results) -> dict:
    return {row.name: row for row in results}


def test_tiny_recipe_passes(synth, tmp_path, wide_console):
    result = CliRunner().invoke(cli, ["doctor", TINY_RECIPE, *tiny_overrides(synth, tmp_path / "run")])
    assert result.exit_code == 0, result.output
    for name in ("torch", "recipe", "LLaVA", "SAM", "train data", "val data", "output", "disk"):
        assert re.search(rf"│ {re.escape(name)} +│ {OK} +│", result.output), (name, result.output)
    # The tiny recipe fits any GPU; without one there is nothing to compare the estimate with.
    memory = OK if torch.cuda.is_available() else WARN
    assert re.search(rf"│ GPU memory +│ {memory} +│ estimated peak", result.output), result.output
    assert "files of 16 of 16 dialogues checked" in result.output
    assert "0 FAIL" in result.output
    assert not (tmp_path / "run").exists()


def test_no_recipe_checks_stack_and_hardware_only():
    results = run_doctor(DoctorConfig())
    names = [row.name for row in results]
    assert names[:8] == ["python", "torch", "transformers", "peft", "accelerate", "segment-anything", "safetensors",
                         "tokenizers"]
    assert "recipe" not in names and "GPU memory" not in names
    gpus = rows_by_name(results)["GPUs"]
    if torch.cuda.is_available():
        assert gpus.status == OK and gpus.detail.startswith(f"{torch.cuda.device_count()} x [0: ")
    else:
        assert gpus.status == WARN and "no GPU" in gpus.detail


def test_version_ranges():
    assert in_range("2.13.0+cpu", ">=2.4")
    assert in_range("5.24.0", "<6,>=5.0")
    assert not in_range("6.0.0", "<6,>=5.0")
    assert not in_range("2.3.1", ">=2.4")
    assert in_range("1.0", ">=1.0")


def test_sample_is_first_n_plus_seeded_draw():
    first = sample_indices(100, 5)
    assert first[:5] == [0, 1, 2, 3, 4]
    assert len(first) == 10 and len(set(first)) == 10 and all(5 <= i < 100 for i in first[5:])
    assert sample_indices(100, 5) == first
    assert sample_indices(3, 5) == [0, 1, 2]


def test_missing_sam_checkpoint_fails_naming_the_path(synth, tmp_path, wide_console):
    missing = tmp_path / "weights" / "medsam_vit_b.pth"
    args = ["doctor", TINY_RECIPE, *tiny_overrides(synth, tmp_path / "run", f"model.segmenter.checkpoint={missing}")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert f"{missing}: SAM checkpoint not found" in result.output


def test_sam_checkpoint_with_a_wrong_shape_fails_naming_the_key(tmp_path):
    config = tiny_config().segmenter
    state = build_sam(config).state_dict()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    config.checkpoint = str(good)
    assert check_sam(config).status == OK
    key = "mask_decoder.output_upscaling.0.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    config.checkpoint = str(bad)
    row = check_sam(config)
    assert row.status == FAIL
    assert str(bad) in row.detail and key in row.detail and "shape mismatch" in row.detail


def test_sam_file_of_another_vit_names_that_variant(tmp_path):
    path = tmp_path / "sam_vit_l.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}, path)
    config = MediRoundConfig().segmenter
    config.variant, config.checkpoint = "vit_b", str(path)
    row = check_sam(config)
    assert row.status == FAIL
    assert "image_encoder.patch_embed.proj.weight [1024, 3, 16, 16] in file vs [768, 3, 16, 16] in model" in row.detail
    assert "looks like vit_l: set model.segmenter.variant=vit_l" in row.detail


def test_hub_name_model_path_fails_with_download_message(synth, tmp_path, monkeypatch, wide_console):
    monkeypatch.chdir(tmp_path)
    hub = "microsoft/llava-med-v1.5-mistral-7b"
    args = ["doctor", TINY_RECIPE, *tiny_overrides(synth, tmp_path / "run", f"model.mllm.source={hub}")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert f"{hub}: looks like a model hub name" in result.output
    assert f"huggingface-cli download {hub} --local-dir weights/llava-med-v1.5-mistral-7b" in result.output


def test_original_layout_llava_folder_gets_the_convert_hint_and_passes_once_converted(tmp_path):
    tokenizer = _tokenizer()
    state, config = _original_state(len(tokenizer))
    source = tmp_path / "llava-med"
    _write_source(source, state, config, tokenizer)
    rows = check_llava(str(source))
    assert [row.status for row in rows] == [FAIL]
    assert "original LLaVA layout (LlavaMistralForCausalLM)" in rows[0].detail
    assert f"mediround convert-llava {source} {source}-hf" in rows[0].detail

    _write_tower(tmp_path / "clip")
    convert_llava(ConvertLlavaConfig(source, tmp_path / "llava-med-hf", vision_tower=tmp_path / "clip"))
    converted = rows_by_name(check_llava(str(tmp_path / "llava-med-hf")))
    assert [converted[name].status for name in ("LLaVA config", "LLaVA weights", "tokenizer")] == [OK, OK, OK]
    assert "[SEG], [REF_CROP], [REF_BOX] will be added when the model is built" in converted["tokenizer"].detail


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory) -> Path:
    """A tiny HF-format LLaVA folder as transformers saves it (legacy key names), tokenizer included."""
    from transformers import LlavaForConditionalGeneration

    folder = tmp_path_factory.mktemp("llava-hf")
    tokenizer = train_tiny_tokenizer(400)
    config = tiny_llava_config(MediRoundConfig(), tokenizer)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_llava_folder_passes_by_headers(hf_llava):
    rows = rows_by_name(check_llava(str(hf_llava)))
    assert [rows[name].status for name in ("LLaVA config", "LLaVA weights", "tokenizer")] == [OK, OK, OK]
    assert "names and shapes match" in rows["LLaVA weights"].detail
    assert all(token in rows["tokenizer"].detail for token in MEDIROUND_TOKENS)


def test_truncated_safetensors_fails_naming_the_file(hf_llava, tmp_path):
    folder = tmp_path / "llava"
    shutil.copytree(hf_llava, folder)
    weights = next(folder.glob("model*.safetensors"))
    shapes = read_safetensors_header(weights)
    lm_head = next(name for name in shapes if name.endswith("lm_head.weight"))
    assert shapes[lm_head][1] == MediRoundConfig().mllm.tiny_text.hidden_size
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    row = rows_by_name(check_llava(str(folder)))["LLaVA weights"]
    assert row.status == FAIL and str(weights) in row.detail and "truncated" in row.detail


def test_dataset_with_a_broken_file_fails(synth, tmp_path, wide_console):
    data = tmp_path / "synth"
    shutil.copytree(synth, data)
    dialogue = load_dialogues(data / "train.jsonl").dialogues[0]
    broken = Path(dialogue.image_path)
    broken.write_bytes(b"not a png")
    args = ["doctor", TINY_RECIPE, *tiny_overrides(data, tmp_path / "run"), "--sample", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "train data" in result.output and str(broken) in result.output


@pytest.fixture(scope="module")
def llava_7b(tmp_path_factory) -> Path:
    """LLaVA-Med v1.5 Mistral-7B's converted config.json (no weights) and a small stand-in tokenizer."""
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    folder = tmp_path_factory.mktemp("llava-7b")
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768)
    LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, image_seq_length=576).save_pretrained(folder)
    train_tiny_tokenizer(2000).save_pretrained(folder)
    return folder


def test_7b_recipe_fit_verdicts_follow_the_estimate(synth, tmp_path, llava_7b):
    recipe = load_recipe(
        RECIPES / "mediround-7b-4gpu.yaml",
        [*tiny_overrides(synth, tmp_path / "run"), "data.root=null", f"model.mllm.source={llava_7b}",
         "train.grad_accum=1"],
    )
    model = build_model(recipe.model, device="meta")
    length = longest_sequence(recipe, model, 32)
    assert length > 576
    estimate = estimate_training_memory(recipe.model, model, recipe.train.batch_size, length)
    assert 24 * GIB * USABLE_FRACTION < estimate.total < 80 * GIB * USABLE_FRACTION

    small = check_memory(recipe, [], 24, None, None, 32).rows[0]
    large = check_memory(recipe, [], 80, None, None, 32).rows[0]
    assert (small.status, large.status) == (FAIL, OK)
    for row in (small, large):
        assert f"estimated peak {estimate.total / GIB:.1f} GiB per process" in row.detail
        assert f"{length} tokens" in row.detail and "batch 15 x accumulation 1" in row.detail

    # The remedy keeps the 15 dialogues per process: the first divisor of 15 whose estimate fits 24 GiB.
    fitting = [b for b in (5, 3, 1)
               if estimate_training_memory(recipe.model, model, b, length).total <= 24 * GIB * USABLE_FRACTION]
    assert fitting, "the estimate says no micro-batch fits 24 GiB"
    assert f"fits with train.batch_size={fitting[0]} train.grad_accum={15 // fitting[0]}" in small.detail

    # Without --gpu-memory the smallest visible GPU decides, and every GPU is a process.
    gpus = [GpuInfo(0, "big", 80 * GIB), GpuInfo(1, "small", 24 * GIB)]
    visible = check_memory(recipe, gpus, None, None, None, 32).rows[0]
    assert visible.status == FAIL and "does not fit GPU 1 (small)" in visible.detail
    assert "2 process(es)" in visible.detail

    hopeless = check_memory(recipe, [], 8, None, None, 32).rows[0]
    assert hopeless.status == FAIL and "does not fit even with" in hopeless.detail


def test_zero2_shards_optimiser_and_gradients_over_the_processes(synth, tmp_path, llava_7b):
    recipe = load_recipe(
        RECIPES / "mediround-7b-4gpu.yaml",
        [*tiny_overrides(synth, tmp_path / "run"), "data.root=null", f"model.mllm.source={llava_7b}"],
    )
    assert zero_stage(str(RECIPES / "zero2.json")) == 2
    model = build_model(recipe.model, device="meta")
    whole = estimate_training_memory(recipe.model, model, 15, longest_sequence(recipe, model, 32))
    # SAM encodes the 15 images before the language model runs: the larger of the two is the peak.
    sharded = (whole.weights + -(-whole.gradients // 4) + -(-whole.optimiser // 4)
               + max(whole.image_encoder, whole.activations + whole.logits))
    row = check_memory(recipe, [], 80, 4, str(RECIPES / "zero2.json"), 32).rows[0]
    assert row.status == OK
    assert f"estimated peak {sharded / GIB:.1f} GiB per process" in row.detail and "4 process(es)" in row.detail
    assert "ZeRO-2" in row.detail
    bad = tmp_path / "zero5.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    failed = check_memory(recipe, [], 80, 4, str(bad), 32).rows[0]
    assert failed.status == FAIL and "'zero_optimization.stage': 5" in failed.detail


def test_a_missing_local_weights_folder_is_not_called_a_hub_name(synth, tmp_path, monkeypatch, wide_console):
    monkeypatch.chdir(tmp_path)
    local = "weights/llava-med-v1.5-mistral-7b-hf"
    result = CliRunner().invoke(cli, ["doctor", TINY_RECIPE, *tiny_overrides(synth, tmp_path / "run", f"model.mllm.source={local}")])
    assert result.exit_code == 1
    assert "hub name" not in result.output and "huggingface-cli" not in result.output
    assert f"{local}: LLaVA folder not found" in result.output and "docs/real-weights.md" in result.output


@pytest.mark.parametrize("deepspeed", [None, "recipes/zero2.json"])
def test_7b_recipe_without_weights_or_data_gets_the_estimate_from_known_sizes(tmp_path, monkeypatch, wide_console,
                                                                              deepspeed):
    """A fresh machine: no weights, no data. The estimate from the preset's known sizes is the one the model
    built on meta would give (1,024 tokens assumed: without the tokenizer no dialogue can be measured)."""
    monkeypatch.chdir(tmp_path)
    # 80 GiB: with SAM encoding the 15 images of a micro-batch at once the recipe no longer fits 48 GiB.
    args = ["doctor", "recipes/mediround-7b-4gpu.yaml", "--gpus", "4", "--gpu-memory", "80"]
    result = CliRunner().invoke(cli, [*args, *(["--deepspeed", deepspeed] if deepspeed else [])])
    assert result.exit_code == 1, result.output  # the missing weights and data fail their own rows
    assert "train data" in result.output and "data/mr-medseg/train.json: file not found" in result.output

    stand_in = write_stand_in_folder(tmp_path / "stand-in")
    recipe = load_recipe("mediround-7b-4gpu", [f"model.mllm.source={stand_in}", "model.segmenter.checkpoint=null"],
                         require_data=False)
    built = estimate_training_memory(recipe.model, build_model(recipe.model, device="meta"), 15, DEFAULT_SEQUENCE_LENGTH)
    sharded = shard_for_zero(built, zero_stage(deepspeed), 4)
    assert sharded.total < built.total if deepspeed else sharded == built
    line = (f"estimated peak {sharded.total / GIB:.1f} GiB per process fits --gpu-memory 80 GiB "
            f"({80 * USABLE_FRACTION:.1f} GiB usable); 4 process(es), "
            f"batch 15 x accumulation 10, gradient checkpointing on, ZeRO-{2 if deepspeed else 0}, bf16 weights, "
            "1024 tokens assumed (no training dialogue to measure); estimate from the llava-med-7b preset's known sizes")
    assert line in " ".join(result.output.split())

    sizes, length, _ = measure_model(load_recipe("mediround-7b-4gpu", require_data=False), 32)
    assert estimate_from_sizes(recipe.model, sizes, 15, length) == built
