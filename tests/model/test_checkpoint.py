import json

import pytest
import torch
from model_fixtures import outputs_in_fresh_process, perturb_lora, sample, tiny_model
from safetensors.torch import load_file, save_file

from mediround.errors import CheckpointError
from mediround.model import build_model, preset
from mediround.model.checkpoint import _sha256, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    torch.set_num_threads(2)
    model = tiny_model(seed=5)
    perturb_lora(model)
    with torch.no_grad():
        model.box_encoder.linear.weight.add_(0.5)
        model.sam.mask_decoder.output_upscaling[0].weight.mul_(1.5)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, folder)
    return model.eval(), folder


def test_checkpoint_reloads_identically_in_a_fresh_process(trained_checkpoint, tmp_path):
    model, folder = trained_checkpoint
    assert {p.name for p in folder.iterdir()} >= {
        "config.json", "manifest.json", "tokenizer", "adapter", "heads.safetensors", "base_llava.safetensors",
        "base_sam.safetensors",
    }
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["heads.safetensors"] == _sha256(folder / "heads.safetensors")
    with torch.no_grad():
        expected = model(model.processor.collate([sample(3, seed=21)]))
    reloaded = outputs_in_fresh_process(folder, tmp_path, sample_rounds=3, sample_seed=21)
    torch.testing.assert_close(reloaded["features"], expected.seg_features[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(reloaded["masks"], expected.mask_logits[0], atol=1e-5, rtol=0)


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _reseal(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: _sha256(folder / name) for name in manifest["files"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_renamed_key_is_named_in_the_error(trained_checkpoint, tmp_path):
    _, folder = trained_checkpoint
    copy = _copy(folder, tmp_path)
    heads = load_file(copy / "heads.safetensors")
    heads["box_encoder.linear.weight_renamed"] = heads.pop("box_encoder.linear.weight")
    save_file(heads, copy / "heads.safetensors")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(copy)
    _reseal(copy)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(copy)
    assert "box_encoder.linear.weight_renamed" in str(error.value)
    assert "missing key(s): box_encoder.linear.weight" in str(error.value)
    partial = load_checkpoint(copy, allow_partial=True)
    assert partial.load_reports[-1].missing == ["box_encoder.linear.weight"]


def test_renamed_adapter_key_is_named(trained_checkpoint, tmp_path):
    _, folder = trained_checkpoint
    copy = _copy(folder, tmp_path)
    path = copy / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "layers.1.self_attn.v_proj.lora_B" in k)
    weights[key + "_x"] = weights.pop(key)
    save_file(weights, path)
    _reseal(copy)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(copy)
    assert "layers.1.self_attn.v_proj.lora_B" in str(error.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_a_sam_checkpoint_is_not_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "medsam.pth"
    torch.save({"image_encoder.pos_embed": _Payload(str(marker))}, bad)
    config = preset("tiny")
    config.segmenter.checkpoint = str(bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        build_model(config)
    assert not marker.exists()


@pytest.mark.parametrize("merge", [True, False])
def test_export_is_standalone_and_gives_the_same_outputs(trained_checkpoint, tmp_path, merge):
    from click.testing import CliRunner

    from mediround_cli.main import cli

    model, folder = trained_checkpoint
    out = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(folder), str(out), "--merge" if merge else "--no-merge"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"llava", "base_sam.safetensors", "heads.safetensors"} <= names
    assert ("adapter" in names) != merge
    exported = load_checkpoint(out).eval()
    assert hasattr(exported.mllm, "peft_config") != merge
    item = sample(3, seed=22)
    with torch.no_grad():
        expected = model(model.processor.collate([item]))
        again = exported(exported.processor.collate([item]))
    torch.testing.assert_close(again.seg_features[0], expected.seg_features[0], atol=1e-4, rtol=0)


def test_sam_pth_with_a_missing_key_is_refused_unless_partial(tmp_path):
    from mediround.model.segmenter import build_sam

    config = preset("tiny")
    state = build_sam(config.segmenter).state_dict()
    del state["mask_decoder.output_upscaling.0.weight"]
    torch.save(state, tmp_path / "sam.pth")
    config.segmenter.checkpoint = str(tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): mask_decoder\.output_upscaling\.0\.weight"):
        build_model(config)
    model = build_model(config, allow_partial=True)
    assert model.load_reports[-1].missing == ["mask_decoder.output_upscaling.0.weight"]
    assert torch.isfinite(model.sam.mask_decoder.output_upscaling[0].weight).all()


def test_loading_a_checkpoint_warns_nothing(tmp_path):
    """transformers' FutureWarning about ``is_gradient_checkpointing`` (read by peft) used to print on every
    command that loads a model."""
    import warnings

    from mediround.default_model import default_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(default_checkpoint())
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
