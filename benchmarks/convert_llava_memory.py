"""Peak memory of ``convert_llava`` against the checkpoint size: the conversion streams shard by shard.

Run: ``python benchmarks/convert_llava_memory.py [--layers N] [--hidden H] [--shard-mb S] [--format safetensors|bin]``.
Writes a synthetic original-layout LLaVA-Mistral checkpoint (random weights, default ~1.3 GB float32) to a
temporary folder, converts it in a child process, and prints the child's peak RSS above an import-only baseline
as a ratio of the checkpoint size. A converter that loaded everything would need a ratio of 1.0 or more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

# VmHWM is the peak RSS of the process's own address space (ru_maxrss would also count the parent's pages
# at fork time); it is printed as the child's last line.
REPORT_PEAK = "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
CONVERT = (
    "import sys; from mediround.convert import ConvertLlavaConfig, convert_llava; "
    "convert_llava(ConvertLlavaConfig(sys.argv[1], sys.argv[2], vision_tower=sys.argv[3], max_shard_bytes=int(sys.argv[4])))"
    + REPORT_PEAK
)
BASELINE = (
    "import torch, transformers, safetensors; from transformers import LlavaForConditionalGeneration"
    + REPORT_PEAK
)


def write_checkpoint(root: Path, layers: int, hidden: int, fmt: str) -> tuple[Path, Path, int]:
    tower = root / "clip"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
    ).save_pretrained(tower)
    source = root / "llava"
    source.mkdir()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ["segment the liver"] * 5, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(source)
    text = {
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": hidden * 7 // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
    }
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MistralForCausalLM(MistralConfig(**text)).state_dict().items()}
    shapes.update(
        {
            "model.mm_projector.0.weight": (hidden, 64),
            "model.mm_projector.0.bias": (hidden,),
            "model.mm_projector.2.weight": (hidden, hidden),
            "model.mm_projector.2.bias": (hidden,),
        }
    )
    config = dict(
        text,
        architectures=["LlavaMistralForCausalLM"],
        model_type="llava_mistral",
        mm_hidden_size=64,
        mm_vision_tower=str(tower),
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        torch_dtype="float32",
    )
    (source / "config.json").write_text(json.dumps(config))
    keys = sorted(shapes)
    groups = [keys[i::4] for i in range(4)]
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        name = f"{'model' if fmt == 'safetensors' else 'pytorch_model'}-{number:05d}-of-00004.{fmt}"
        part = {key: torch.randn(shapes[key]) * 0.02 for key in group}
        total += sum(t.numel() * 4 for t in part.values())
        if fmt == "safetensors":
            save_file(part, str(source / name))
        else:
            torch.save(part, source / name)
        weight_map.update({key: name for key in group})
        del part
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (source / index).write_text(json.dumps({"weight_map": weight_map}))
    return source, tower, total


def child_peak_rss(code: str, *args: str) -> int:
    """Peak RSS in bytes of one child process (VmHWM is in KiB)."""
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard-mb", type=int, default=128)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        source, tower, total = write_checkpoint(root, args.layers, args.hidden, args.format)
        baseline = child_peak_rss(BASELINE)
        peak = child_peak_rss(CONVERT, str(source), str(root / "hf"), str(tower), str(args.shard_mb * 2**20))
    print(f"checkpoint {total / 2**20:.0f} MiB ({args.format}), output shards <= {args.shard_mb} MiB")
    print(f"import-only RSS {baseline / 2**20:.0f} MiB, conversion peak RSS {peak / 2**20:.0f} MiB")
    print(f"(peak - baseline) / checkpoint size = {(peak - baseline) / total:.2f}")


if __name__ == "__main__":
    main()
