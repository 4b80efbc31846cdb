"""Weight checks that read headers, not tensors: the LLaVA folder, its tokenizer, the SAM/MedSAM ``.pth``.

Names and shapes are compared with the model built on the meta device from the same config, through the
model's own load report, so the doctor refuses exactly what the loader would refuse at step 0.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

from mediround.convert.llava import TEXT_MODEL_TYPES
from mediround.doctor.checks import FAIL, OK, WARN, CheckResult
from mediround.errors import CheckpointError
from mediround.model.config import SegmenterConfig
from mediround.model.load_report import load_into, report_from_lists
from mediround.model.segmenter import VIT_LAYOUTS, build_sam, read_sam_state
from mediround.model.tokenizer import IMAGE_TOKEN, MEDIROUND_TOKENS
from mediround.model.weight_sources import missing_path_detail

GIB = 1024**3
MAX_HEADER_BYTES = 100 * 1024**2
SAM_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


def read_safetensors_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's JSON header; no tensor data is read.

    A header that does not parse, or tensor data that would end past the end of the file (an interrupted
    download), raises ``CheckpointError`` naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {length}, file {size} bytes)")
            header = json.loads(handle.read(length))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a mapping")
    header.pop("__metadata__", None)
    shapes, end = {}, 0
    for name, entry in header.items():
        try:
            shapes[name] = tuple(int(n) for n in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path}: tensor '{name}': malformed header entry") from None
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header needs {8 + length + end} bytes, the file has {size} (download again)"
        )
    return shapes


def is_original_llava(config: dict) -> bool:
    """An original-layout LLaVA config (``LlavaMistralForCausalLM`` etc.), which transformers cannot load."""
    return config.get("model_type") in TEXT_MODEL_TYPES and "text_config" not in config


def check_llava(source: str) -> list[CheckResult]:
    """The LLaVA folder of ``model.mllm.source``: config, weight headers against the config, tokenizer."""
    if source == "tiny":
        return [CheckResult("LLaVA", OK, "built from config (tiny preset); nothing to load")]
    folder = Path(source)
    if not folder.exists():
        return [CheckResult("LLaVA", FAIL, missing_path_detail(source, "LLaVA folder"))]
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [CheckResult("LLaVA", FAIL, f"{folder}: not an HF-format LLaVA folder (no config.json)")]
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        return [CheckResult("LLaVA", FAIL, f"{config_path}: cannot parse: {error}")]
    if not isinstance(raw, dict):
        return [CheckResult("LLaVA", FAIL, f"{config_path}: not a JSON object")]
    if is_original_llava(raw):
        return [
            CheckResult(
                "LLaVA",
                FAIL,
                f"{folder}: original LLaVA layout ({', '.join(raw.get('architectures') or [raw['model_type']])}), "
                f"which transformers cannot load: run `mediround convert-llava {folder} {folder}-hf "
                f"--vision-tower CLIP_DIR` first and set model.mllm.source to {folder}-hf",
            )
        ]
    if raw.get("model_type") != "llava":
        return [CheckResult("LLaVA", FAIL, f"{config_path}: model_type {raw.get('model_type')!r} is not 'llava'")]
    from transformers import LlavaConfig

    try:
        config = LlavaConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        return [CheckResult("LLaVA", FAIL, f"{config_path}: does not parse as LlavaConfig: {error}")]
    text, vision = config.text_config, config.vision_config
    described = (
        f"{folder}: {text.model_type} {text.hidden_size} x {text.num_hidden_layers} layers, vocab "
        f"{text.vocab_size}; vision {vision.image_size} px / {vision.patch_size} -> {config.image_seq_length} "
        "image tokens"
    )
    return [
        CheckResult("LLaVA config", OK, described),
        _llava_weights(folder, config),
        _llava_tokenizer(folder, config),
    ]


def _llava_weights(folder: Path, config) -> CheckResult:
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    try:
        files, stored = _weight_headers(folder)
    except CheckpointError as error:
        return CheckResult("LLaVA weights", FAIL, str(error))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    # transformers renames legacy checkpoint keys when it loads (and writes them when it saves): compare
    # under the same renaming.
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    stored = {apply_renamings(name, renamings): shape for name, shape in stored.items()}
    tied = bool(getattr(config.text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    report = report_from_lists(
        str(folder),
        missing=[name for name in expected if name not in stored],
        unexpected=[name for name in stored if name not in expected],
        mismatched=[(k, shape, expected[k]) for k, shape in stored.items() if k in expected and shape != expected[k]],
        expected_missing=r"^lm_head\.weight$" if tied else None,
    )
    if not report.ok:
        return CheckResult("LLaVA weights", FAIL, f"{folder}: weights do not match its config.json: {report.describe()}")
    size = sum(path.stat().st_size for path in files)
    return CheckResult(
        "LLaVA weights", OK, f"{len(stored)} tensors in {len(files)} file(s), {size / GIB:.2f} GiB; names and shapes match"
    )


def _weight_headers(folder: Path) -> tuple[list[Path], dict[str, tuple[int, ...]]]:
    """Every weight file of an HF folder and the shape of every tensor, from headers (``.bin``: mmap)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: unreadable index: {error}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{index}: shard '{path.name}' is missing")
    else:
        files = sorted(folder.glob("model*.safetensors"))
    if files:
        stored: dict[str, tuple[int, ...]] = {}
        for path in files:
            stored.update(read_safetensors_header(path))
        return files, stored
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{folder}: no weights found (model*.safetensors or pytorch_model*.bin)")
    import torch

    stored = {}
    for path in bins:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as error:
            raise CheckpointError(f"{path}: cannot read with weights_only=True: {error}") from None
        stored.update({name: tuple(tensor.shape) for name, tensor in state.items()})
    return bins, stored


def _llava_tokenizer(folder: Path, config) -> CheckResult:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return CheckResult("tokenizer", FAIL, f"{folder}: tokenizer does not load: {first}")
    vocab = tokenizer.get_vocab()
    image_id = vocab.get(IMAGE_TOKEN)
    if image_id != config.image_token_index:
        return CheckResult(
            "tokenizer",
            FAIL,
            f"{folder}: {IMAGE_TOKEN} is id {image_id} in the tokenizer but image_token_index is "
            f"{config.image_token_index} in config.json (convert with `mediround convert-llava`)",
        )
    missing = [token for token in MEDIROUND_TOKENS if token not in vocab]
    if not missing:
        return CheckResult("tokenizer", OK, f"{len(tokenizer)} tokens; {', '.join(MEDIROUND_TOKENS)} present")
    return CheckResult(
        "tokenizer",
        OK,
        f"{len(tokenizer)} tokens; {', '.join(missing)} will be added when the model is built "
        f"({len(missing)} new embedding row(s))",
    )


def check_sam(config: SegmenterConfig) -> CheckResult:
    """The SAM/MedSAM ``.pth``: tensor names and shapes against the configured variant (mmap, no pickle code)."""
    if config.checkpoint is None:
        if config.variant == "tiny":
            return CheckResult("SAM", OK, "built from config (tiny variant); nothing to load")
        return CheckResult(
            "SAM", WARN, f"no checkpoint: SAM {config.variant} starts from random weights (set model.segmenter.checkpoint)"
        )
    if not Path(config.checkpoint).is_file():
        return CheckResult("SAM", FAIL, missing_path_detail(config.checkpoint, "SAM checkpoint"))
    try:
        state = read_sam_state(config.checkpoint)
    except CheckpointError as error:
        return CheckResult("SAM", FAIL, str(error))
    report = load_into(build_sam(config, "meta"), state, config.checkpoint, allow_partial=True, assign=True)
    if not report.ok:
        return CheckResult("SAM", FAIL, f"{config.checkpoint}: does not fit SAM {config.variant}: {report.describe()}"
                           + _variant_hint(state, config.variant))
    return CheckResult("SAM", OK, f"{config.checkpoint}: {config.variant}, {len(state)} tensors; names and shapes match")


def _variant_hint(state: dict, variant: str) -> str:
    patch = state.get(SAM_PATCH_KEY)
    if patch is None:
        return ""
    for name, layout in VIT_LAYOUTS.items():
        if name != variant and patch.shape[0] == layout["embed_dim"]:
            return f" (the file looks like {name}: set model.segmenter.variant={name})"
    return ""
