"""Convert an original-layout LLaVA / LLaVA-Med checkpoint into a transformers ``LlavaForConditionalGeneration`` folder.

The original layout (``LlavaMistralForCausalLM``: ``model.layers.*``, ``model.mm_projector.*``, an optional
``model.vision_tower.vision_tower.*`` and a CLIP tower named by ``mm_vision_tower``) cannot be loaded by
transformers. This module renames every tensor into the transformers 5.x layout, checks that every source
tensor is consumed and every target tensor produced, and writes safetensors shards one source shard at a
time, so peak memory is one output shard plus one source tensor (or one ``.bin`` shard, memory-mapped).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mediround.atomic import write_json
from mediround.errors import CheckpointError

IMAGE_TOKEN = "<image>"
TEXT_MODEL_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama"}
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Fields of the original config that describe the LLaVA wrapper or training, not the text model.
# ``use_cache`` is saved as false by LLaVA training runs; kept, it would switch off the KV cache at inference.
LLAVA_ONLY_FIELDS = {
    "use_cache",
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "mm_projector_lr",
    "mm_vision_tower_lr",
}
PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}
LORA_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)\.|\.base_layer\.")
ROTARY_BUFFER = re.compile(r"\.rotary_emb\.inv_freq$")
CLIP_TEXT_HALF = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
EMBEDDED_TOWER_PREFIXES = (
    "model.vision_tower.vision_tower.vision_model.",
    "model.vision_tower.vision_tower.",
)
VOCAB_ROWS_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")

# LLaVA's conv_mistral_instruct (sep_style LLAMA_2, empty system): "[INST] <image>\nQ [/INST] A </s>[INST] ...".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set images = 0 %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ '<image>\\n' * images }}{{ text }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ text }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass
class ConvertLlavaConfig:
    """What to convert, where to, and how strict to be."""

    source: Path
    output: Path
    vision_tower: Path | str | None = None
    allow_partial_load: bool = False
    dtype: str | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False


@dataclass
class LlavaConversionReport:
    """What the conversion read, renamed, dropped and wrote."""

    output: Path
    source_tensors: int
    tensors_written: int
    bytes_written: int
    shard_files: list[str]
    image_token_index: int
    image_token_added: bool
    source_vocab_size: int
    vocab_size: int
    image_seq_length: int
    vision_weights_from: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = dict(self.__dict__)
        data["output"] = str(self.output)
        return data


@dataclass
class _WeightFile:
    path: Path
    keys: list[str]


@dataclass
class _Plan:
    """Where each tensor goes: ``(file, source key, target key)`` in reading order, plus the leftovers."""

    moves: list[tuple[_WeightFile, str, str]]
    missing: list[str]
    unexpected: list[str]
    dropped: list[str]


def convert_llava(
    config: ConvertLlavaConfig, progress: Callable[[int, int], None] | None = None
) -> LlavaConversionReport:
    """Convert ``config.source`` into an HF LLaVA folder at ``config.output``; raise CheckpointError on any mismatch."""
    source = Path(config.source)
    output = Path(config.output)
    if config.dtype is not None and config.dtype not in DTYPES:
        raise CheckpointError(f"dtype '{config.dtype}' is not one of {sorted(DTYPES)}")
    if output.exists() and not config.overwrite:
        raise CheckpointError(f"{output}: already exists (pass overwrite to replace it)")
    original = _read_original_config(source)
    _refuse_unmerged_lora(source)
    tower = _resolve_vision_tower(source, original, config.vision_tower)
    vision_config = _vision_config(tower, original, source)

    text_config = _text_config(original)
    tokenizer = _load_tokenizer(source, text_config)
    image_token_added = IMAGE_TOKEN not in tokenizer.get_vocab()
    if image_token_added:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    source_vocab = int(original["vocab_size"])
    text_config.vocab_size = max(source_vocab, image_token_index + 1)

    llava_config = llava_config_for(original, text_config, vision_config, image_token_index, config.dtype)
    target_shapes = _target_shapes(llava_config)

    source_files = _list_weight_files(source)
    _refuse_lora_tensors(source, source_files)
    embedded = any(key.startswith(EMBEDDED_TOWER_PREFIXES) for file in source_files for key in file.keys)
    tower_files = [] if embedded else _list_weight_files(tower)
    plan = _plan(source_files, tower_files, target_shapes)
    if (plan.missing or plan.unexpected) and not config.allow_partial_load:
        raise CheckpointError(_mismatch_message(source, plan))

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        cast = DTYPES.get(config.dtype) if config.dtype else None
        writer = _ShardWriter(staging, config.max_shard_bytes)
        for done, (target, tensor) in enumerate(_moved_tensors(plan, target_shapes, cast), start=1):
            writer.add(target, tensor)
            if progress is not None:
                progress(done, len(plan.moves))
        shard_files = writer.finish()
        llava_config.save_pretrained(staging)
        _save_processor(staging, tokenizer, tower, llava_config, original)
        if (source / "generation_config.json").is_file():
            shutil.copyfile(source / "generation_config.json", staging / "generation_config.json")
        report = LlavaConversionReport(
            output=output,
            source_tensors=sum(len(file.keys) for file in source_files),
            tensors_written=writer.tensors,
            bytes_written=writer.total_bytes,
            shard_files=shard_files,
            image_token_index=image_token_index,
            image_token_added=image_token_added,
            source_vocab_size=source_vocab,
            vocab_size=llava_config.text_config.vocab_size,
            image_seq_length=llava_config.image_seq_length,
            vision_weights_from=str(source) if embedded else str(tower),
            missing=plan.missing,
            unexpected=plan.unexpected,
            dropped=plan.dropped,
        )
        write_json(staging / "conversion_report.json", report.as_dict())
        _publish(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def llava_config_for(
    original: dict, text_config, vision_config, image_token_index: int, dtype: str | None = None
):
    """The ``LlavaConfig`` equivalent to an original LLaVA ``config.json`` with this text and vision config."""
    from transformers import LlavaConfig

    strategy = SELECT_STRATEGIES[original.get("mm_vision_select_feature", "patch")]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        image_seq_length=patches + (1 if strategy == "full" else 0),
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
    )
    llava_config.architectures = ["LlavaForConditionalGeneration"]
    llava_config.dtype = dtype or original.get("torch_dtype") or original.get("dtype") or "float32"
    return llava_config


def _read_original_config(source: Path) -> dict:
    path = source / "config.json"
    if not source.is_dir():
        raise CheckpointError(f"{source}: not a folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (an original-layout LLaVA folder has config.json)")
    try:
        original = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from error
    checks = {
        "model_type": (original.get("model_type"), set(TEXT_MODEL_TYPES)),
        "mm_projector_type": (original.get("mm_projector_type", "linear"), {"mlp2x_gelu"}),
        "mm_vision_select_feature": (
            original.get("mm_vision_select_feature", "patch"),
            set(SELECT_STRATEGIES),
        ),
        "mm_patch_merge_type": (original.get("mm_patch_merge_type", "flat"), {"flat"}),
        "image_aspect_ratio": (original.get("image_aspect_ratio", "square"), {"pad", "square"}),
        "mm_use_im_start_end": (original.get("mm_use_im_start_end", False), {False}),
    }
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise CheckpointError(
                f"{path}: field '{name}': {value!r} is not supported (expected one of {sorted(map(str, allowed))})"
            )
    if "vocab_size" not in original:
        raise CheckpointError(f"{path}: field 'vocab_size': missing")
    return original


def _refuse_unmerged_lora(source: Path) -> None:
    if (source / "adapter_config.json").is_file() or (source / "non_lora_trainables.bin").is_file():
        raise CheckpointError(
            f"{source}: holds an unmerged LoRA adapter (adapter_config.json / non_lora_trainables.bin); "
            "merge it into the base weights first (LLaVA's scripts/merge_lora_weights.py) and convert the merged folder"
        )


def _refuse_lora_tensors(source: Path, files: list[_WeightFile]) -> None:
    lora = [key for file in files for key in file.keys if LORA_TENSOR.search(key)]
    if lora:
        raise CheckpointError(
            f"{source}: holds {len(lora)} unmerged LoRA tensors (e.g. {lora[0]}); merge them into the base "
            "weights first (LLaVA's scripts/merge_lora_weights.py) and convert the merged folder"
        )


def _resolve_vision_tower(source: Path, original: dict, given: Path | str | None) -> Path:
    name = given if given is not None else original.get("mm_vision_tower")
    if name is None:
        raise CheckpointError(
            f"{source / 'config.json'}: field 'mm_vision_tower': missing; pass --vision-tower DIR"
        )
    candidates = (
        [Path(name)] if given is not None or Path(name).is_absolute() else [Path(name), source / name]
    )
    for candidate in candidates:
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise CheckpointError(f"{candidate}: vision tower folder has no config.json")
            return candidate
    raise CheckpointError(
        f"vision tower '{name}' is not a local folder and this tool never downloads; on a machine with internet run "
        f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here, then pass --vision-tower DIR"
    )


def _vision_config(tower: Path, original: dict, source: Path):
    from transformers import CLIPVisionConfig

    try:
        vision_config = CLIPVisionConfig.from_pretrained(str(tower), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{tower / 'config.json'}: not a CLIP vision config: {error}") from error
    expected = original.get("mm_hidden_size")
    if expected is not None and int(expected) != vision_config.hidden_size:
        raise CheckpointError(
            f"{source / 'config.json'}: field 'mm_hidden_size': {expected} does not match the vision tower "
            f"{tower} (hidden_size {vision_config.hidden_size})"
        )
    return vision_config


def _text_config(original: dict):
    from transformers import CONFIG_MAPPING

    fields = {
        key: value
        for key, value in original.items()
        if key not in LLAVA_ONLY_FIELDS and not key.startswith("mm_")
    }
    text_config = CONFIG_MAPPING[TEXT_MODEL_TYPES[original["model_type"]]](**fields)
    text_config.architectures = None
    return text_config


def _load_tokenizer(source: Path, text_config):
    from transformers import AutoTokenizer

    # Without sentencepiece, transformers falls back to a TikToken reading of tokenizer.model and can
    # return a wrong tokenizer without an error.
    if not (source / "tokenizer.json").is_file() and (source / "tokenizer.model").is_file():
        missing = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
        if missing:
            raise CheckpointError(
                f"{source / 'tokenizer.model'}: reading a SentencePiece tokenizer needs {' and '.join(missing)}; "
                "run `pip install sentencepiece protobuf` for the conversion (the output folder gets tokenizer.json)"
            )
    try:
        return AutoTokenizer.from_pretrained(str(source), config=text_config, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise CheckpointError(f"{source}: the tokenizer cannot be loaded: {error}") from error


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _target_shapes(llava_config) -> dict[str, torch.Size]:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if llava_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _list_weight_files(folder: Path) -> list[_WeightFile]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            grouped: dict[str, list[str]] = {}
            for key, file_name in weight_map.items():
                grouped.setdefault(file_name, []).append(key)
            for file_name in grouped:
                if not (folder / file_name).is_file():
                    raise CheckpointError(f"{index}: shard '{file_name}' is missing")
            return [_WeightFile(folder / name, keys) for name, keys in sorted(grouped.items())]
    safetensors_files = sorted(folder.glob("model*.safetensors"))
    if safetensors_files:
        files = []
        for path in safetensors_files:
            with safe_open(str(path), framework="pt") as handle:
                files.append(_WeightFile(path, list(handle.keys())))
        return files
    bin_files = sorted(folder.glob("pytorch_model*.bin"))
    if bin_files:
        return [_WeightFile(path, list(_load_bin(path))) for path in bin_files]
    raise CheckpointError(f"{folder}: no weights found (model*.safetensors or pytorch_model*.bin)")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # a weights-only unpickling failure has no narrower public type
        raise CheckpointError(f"{path}: cannot be read as a weights-only state dict: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _source_target(key: str) -> str:
    if key.startswith("model.mm_projector."):
        layer, _, rest = key[len("model.mm_projector.") :].partition(".")
        return f"model.multi_modal_projector.{PROJECTOR_LAYERS.get(layer, 'layer_' + layer)}.{rest}"
    for prefix in EMBEDDED_TOWER_PREFIXES:
        if key.startswith(prefix):
            return "model.vision_tower." + key[len(prefix) :]
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def _plan(source_files: list[_WeightFile], tower_files: list[_WeightFile], target_shapes: dict) -> _Plan:
    moves, unexpected, dropped, produced = [], [], [], set()

    def place(file: _WeightFile, key: str, target: str, label: str) -> None:
        if target in target_shapes and target not in produced:
            moves.append((file, key, target))
            produced.add(target)
        else:
            unexpected.append(label)

    for file in source_files:
        for key in file.keys:
            if ROTARY_BUFFER.search(key):
                dropped.append(key)
            else:
                place(file, key, _source_target(key), key)
    for file in tower_files:
        for key in file.keys:
            rest = key.removeprefix("vision_model.")
            if key.startswith(CLIP_TEXT_HALF) or rest == "embeddings.position_ids":
                dropped.append(f"{file.path.name}:{key}")
            else:
                place(file, key, "model.vision_tower." + rest, f"{file.path.name}:{key}")
    missing = sorted(set(target_shapes) - produced)
    return _Plan(moves, missing, sorted(unexpected), sorted(dropped))


def _mismatch_message(source: Path, plan: _Plan) -> str:
    parts = []
    for label, keys in (
        ("missing target tensors", plan.missing),
        ("unexpected source tensors", plan.unexpected),
    ):
        if keys:
            shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    return (
        f"{source}: weights do not match LlavaForConditionalGeneration: "
        + "; ".join(parts)
        + " (--allow-partial-load to write anyway)"
    )


def _moved_tensors(
    plan: _Plan, target_shapes: dict, cast: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield renamed tensors file by file, so only one source file is open at a time."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    files: dict[Path, _WeightFile] = {}
    for file, key, target in plan.moves:
        by_file.setdefault(file.path, []).append((key, target))
        files[file.path] = file
    for path, pairs in by_file.items():
        for key, target, tensor in _read_file(files[path], pairs):
            tensor = _fit_vocab(target, tensor, target_shapes[target])
            if tensor.shape != target_shapes[target]:
                raise CheckpointError(
                    f"{path}: tensor '{key}': shape {tuple(tensor.shape)} does not match {target} {tuple(target_shapes[target])}"
                )
            if cast is not None and tensor.is_floating_point():
                tensor = tensor.to(cast)
            yield target, tensor.contiguous().clone()


def _read_file(file: _WeightFile, pairs: list[tuple[str, str]]) -> Iterator[tuple[str, str, torch.Tensor]]:
    if file.path.suffix == ".safetensors":
        with safe_open(str(file.path), framework="pt") as handle:
            for key, target in pairs:
                yield key, target, handle.get_tensor(key)
    else:
        state = _load_bin(file.path)
        for key, target in pairs:
            if key not in state:
                raise CheckpointError(f"{file.path}: tensor '{key}' listed in the index is not in the file")
            yield key, target, state.pop(key)


def _fit_vocab(target: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Grow the vocabulary rows for the added <image> token.

    The new embedding row is never looked up (image features replace it); the new lm_head row is the mean of
    the others, so its logit is the mean of the other logits and greedy decoding never emits <image>.
    """
    if (
        target not in VOCAB_ROWS_KEYS
        or tensor.ndim != 2
        or tensor.shape[1] != shape[1]
        or tensor.shape[0] >= shape[0]
    ):
        return tensor
    extra = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype).expand(shape[0] - tensor.shape[0], -1)
    return torch.cat([tensor, extra], dim=0)


class _ShardWriter:
    """Buffer tensors up to ``max_bytes`` and write each full buffer as one safetensors shard."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.parts: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.tensors = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor
        self.buffer_bytes += size
        self.total_bytes += size
        self.tensors += 1

    def _flush(self) -> None:
        part = f"part-{len(self.parts) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.folder / part), metadata={"format": "pt"})
        self.parts.append((part, list(self.buffer)))
        self.buffer = {}
        self.buffer_bytes = 0

    def finish(self) -> list[str]:
        if self.buffer or not self.parts:
            self._flush()
        if len(self.parts) == 1:
            os.replace(self.folder / self.parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for number, (part, keys) in enumerate(self.parts, start=1):
            name = f"model-{number:05d}-of-{len(self.parts):05d}.safetensors"
            os.replace(self.folder / part, self.folder / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        write_json(
            self.folder / "model.safetensors.index.json",
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
        )
        return names


def _save_processor(folder: Path, tokenizer, tower: Path, llava_config, original: dict) -> None:
    from transformers import LlavaImageProcessor, LlavaProcessor

    vision_config = llava_config.vision_config
    settings = {}
    preprocessor = tower / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text(encoding="utf-8"))
    size = settings.get("size", vision_config.image_size)
    crop = settings.get("crop_size", vision_config.image_size)
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": size} if isinstance(size, int) else size,
        crop_size={"height": crop, "width": crop} if isinstance(crop, int) else crop,
        image_mean=settings.get("image_mean", LlavaImageProcessor.image_mean),
        image_std=settings.get("image_std", LlavaImageProcessor.image_std),
        do_pad=original.get("image_aspect_ratio") == "pad",
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(folder))


def _publish(staging: Path, output: Path) -> None:
    if not output.exists():
        os.replace(staging, output)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    os.replace(output, retired / output.name)
    os.replace(staging, output)
    shutil.rmtree(retired)
