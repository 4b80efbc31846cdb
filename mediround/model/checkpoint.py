"""MediRound checkpoints: a folder anyone can inspect, loaded without pickle, checked key by key.

Layout::

    config.json                 MediRoundConfig (base model references and every setting)
    manifest.json               format, base vocabulary size, sha256 of every other file
    tokenizer/                  the tokenizer with MediRound's tokens (save_pretrained)
    adapter/                    peft LoRA adapter (adapter_model.safetensors + adapter_config.json),
                                including the trained embed_tokens/lm_head (full or rows)
    heads.safetensors           mask decoder, [SEG] projection, box encoder, JCM, and any other
                                trainable parameter the adapter does not hold
    base_llava.safetensors      full base LLaVA weights, when the base cannot be re-fetched (tiny preset)
    base_sam.safetensors        full SAM weights, when no SAM checkpoint path is configured
    token_rows.safetensors      initial rows of the added tokens, when the base LLaVA comes from a path

Saving writes a temporary folder beside the target and renames it. Loading verifies every sha256 first,
then routes each weight file through ``load_report`` (names of missing/unexpected/mis-shaped keys,
``CheckpointError`` unless ``allow_partial``). A relative ``mllm.source`` naming a folder inside the
checkpoint (an export's ``llava/``) is resolved against the checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from mediround.atomic import write_json
from mediround.errors import CheckpointError, RecipeError
from mediround.model.build import apply_trainability, build_model, part_module
from mediround.model.config import PARTS, MediRoundConfig
from mediround.model.load_report import LoadReport, load_into, report_from_lists
from mediround.model.mediround import MediRound

FORMAT = "mediround-checkpoint/1"
HEAD_PARTS = tuple(part for part in PARTS.values() if part.heads_file)
"""The modules ``heads.safetensors`` holds whole (``config.Part.heads_file``)."""
SAM_IN_HEADS = tuple(part.module.removeprefix("sam.") + "." for part in HEAD_PARTS if part.module.startswith("sam."))
"""Prefixes of the SAM keys that ``heads.safetensors`` holds, so ``base_sam.safetensors`` leaves them out."""
_SAM_IN_HEADS_PATTERN = "|".join(f"^{re.escape(prefix)}" for prefix in SAM_IN_HEADS)
ADAPTER_MARKERS = ("lora_", "modules_to_save", "trainable_tokens_delta")


def clean_base_state(llava: nn.Module) -> dict[str, torch.Tensor]:
    """LLaVA's own weights with peft's wrappers removed (LoRA and trained copies left out)."""
    state = {}
    for key, value in llava.state_dict().items():
        if any(marker in key for marker in ADAPTER_MARKERS):
            continue
        for wrapper in (".original_module", ".token_adapter", ".base_layer"):
            key = key.replace(wrapper, "")
        state[key] = value.detach().contiguous()
    return state


def _adapter_owned(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def head_state(model: MediRound) -> dict[str, torch.Tensor]:
    """Trained weights outside the adapter: the head modules plus every other trainable parameter."""
    state = {}
    for part in HEAD_PARTS:
        module = part_module(model, part)
        if module is not None:  # the entity head exists only when the config names entities
            state.update({f"{part.module}.{k}": v for k, v in module.state_dict().items()})
    for name, param in model.named_parameters():
        if param.requires_grad and not _adapter_owned(name):
            state[name] = param
    return {k: v.detach().contiguous() for k, v in state.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    model: MediRound, folder: str | os.PathLike, write_extra: Callable[[Path], None] | None = None
) -> Path:
    """Write ``model`` as a checkpoint folder, atomically (temporary folder, then rename).

    ``write_extra(tmp_folder)`` may add files (e.g. an exported LLaVA folder); the manifest covers them.
    """
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        config = model.config
        config.to_json(tmp / "config.json")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        if hasattr(model.mllm, "peft_config"):
            model.mllm.save_pretrained(tmp / "adapter")
            (tmp / "adapter" / "README.md").unlink(missing_ok=True)
        save_file(head_state(model), tmp / "heads.safetensors")
        if config.mllm.source == "tiny":
            save_file(clean_base_state(model.llava), tmp / "base_llava.safetensors")
        else:
            base = clean_base_state(model.llava)
            rows = {
                "embed": base["model.language_model.embed_tokens.weight"][model.base_vocab :].contiguous(),
                "lm_head": base["lm_head.weight"][model.base_vocab :].contiguous(),
            }
            if rows["embed"].shape[0]:
                save_file(rows, tmp / "token_rows.safetensors")
        if write_extra is not None:
            write_extra(tmp)
        if config.segmenter.checkpoint is None:
            # The mask decoder is in heads.safetensors already; storing it twice doubled the tiny checkpoint.
            sam_state = {k: v.detach().contiguous() for k, v in model.sam.state_dict().items()
                         if not k.startswith(SAM_IN_HEADS)}
            save_file(sam_state, tmp / "base_sam.safetensors")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "base_vocab": model.base_vocab, "files": {f: _sha256(tmp / f) for f in files}}
        write_json(tmp / "manifest.json", manifest)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def verify_manifest(folder: Path) -> dict:
    """Check the manifest's sha256 of every file; name the first file that is missing or altered."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a MediRound checkpoint (no manifest.json)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable manifest: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' object)")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the manifest but missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: sha256 differs from the manifest (file altered or corrupt)")
    return manifest


def load_checkpoint(
    folder: str | os.PathLike, device: str | torch.device = "cpu", allow_partial: bool = False,
    verify: bool = True, config: MediRoundConfig | None = None,
) -> MediRound:
    """Rebuild the model from a checkpoint folder. Raises ``CheckpointError`` naming any bad file or key.

    ``verify=False`` skips the sha256 check (the key checks still run). ``allow_partial=True`` loads what
    matches; the reports are then on ``model.load_reports``. ``config`` builds the model from that config
    instead of the folder's ``config.json`` (a fine-tune with its own base-weight paths and loss weights;
    its weights must fit the checkpoint's, which the key checks enforce).
    """
    folder = Path(folder)
    manifest = verify_manifest(folder) if verify else json.loads((folder / "manifest.json").read_text())
    if config is None:
        try:
            config = MediRoundConfig.from_json(folder / "config.json")
        except RecipeError as error:
            raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
        source = Path(config.mllm.source)
        if config.mllm.source != "tiny" and not source.is_absolute() and (folder / source / "config.json").is_file():
            config.mllm.source = str(folder / source)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    reports: list[LoadReport] = []

    def load_base(llava: nn.Module, sam: nn.Module, base_vocab: int) -> None:
        if base_vocab != manifest["base_vocab"]:
            raise CheckpointError(
                f"{config.mllm.source}: base vocabulary has {base_vocab} rows, the checkpoint was made on "
                f"{manifest['base_vocab']}"
            )
        llava_file = folder / "base_llava.safetensors"
        if llava_file.is_file():
            reports.append(load_into(llava, _read(llava_file), str(llava_file), allow_partial=allow_partial))
        rows_file = folder / "token_rows.safetensors"
        if rows_file.is_file():
            rows = _read(rows_file)
            embed = llava.get_input_embeddings().weight
            wanted = (embed.shape[0] - base_vocab, embed.shape[1])
            for name in ("embed", "lm_head"):
                if name not in rows or tuple(rows[name].shape) != wanted:
                    found = tuple(rows[name].shape) if name in rows else "absent"
                    raise CheckpointError(f"{rows_file}: '{name}' rows are {found}, the model needs {wanted}")
            with torch.no_grad():
                llava.get_input_embeddings().weight[base_vocab:] = rows["embed"]
                llava.get_output_embeddings().weight[base_vocab:] = rows["lm_head"]
        sam_file = folder / "base_sam.safetensors"
        if sam_file.is_file():
            reports.append(load_into(sam, _read(sam_file), str(sam_file), expected_missing=_SAM_IN_HEADS_PATTERN,
                                     allow_partial=allow_partial))

    model = build_model(config, tokenizer=tokenizer, device=device, allow_partial=allow_partial, on_base=load_base)
    adapter = folder / "adapter"
    if hasattr(model.mllm, "peft_config"):
        reports.append(_load_adapter(model, adapter, allow_partial))
    heads_file = folder / "heads.safetensors"
    reports.append(_load_heads(model, _read(heads_file), str(heads_file), allow_partial))
    model.load_reports = model.load_reports + reports
    return model


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file: {error}") from None


def _load_adapter(model: MediRound, folder: Path, allow_partial: bool) -> LoadReport:
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file}: LoRA adapter missing")
    weights = load_peft_weights(str(folder), device="cpu")
    expected = {k for k, _ in model.mllm.named_parameters() if _adapter_owned(k)}
    try:
        result = set_peft_model_state_dict(model.mllm, weights)
    except RuntimeError as error:
        raise CheckpointError(f"{weights_file}: weights do not match the model: {error}") from None
    missing = [k for k in result.missing_keys if k in expected]
    report = report_from_lists(str(weights_file), missing=missing, unexpected=result.unexpected_keys)
    if not allow_partial:
        report.raise_if_bad()
    return report


def _load_heads(model: MediRound, state: dict[str, torch.Tensor], source: str, allow_partial: bool) -> LoadReport:
    expected = set(head_state(model))
    own = model.state_dict()
    report = report_from_lists(
        source,
        missing=sorted(expected - set(state)),
        unexpected=sorted(set(state) - expected),
        mismatched=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                    if k in own and tuple(v.shape) != tuple(own[k].shape)],
    )
    if not allow_partial:
        report.raise_if_bad()
    bad = {k for k, _, _ in report.mismatched} | set(report.unexpected)
    model.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return report


def export_checkpoint(
    folder: str | os.PathLike, out: str | os.PathLike, merge: bool = True, allow_partial: bool = False,
    on_load: Callable[[list[LoadReport]], None] | None = None,
) -> Path:
    """Write a standalone checkpoint: the base LLaVA as an HF folder inside it (``llava/``), SAM weights,
    heads and tokenizer, so nothing outside the folder is needed. With ``merge`` the LoRA adapter and the
    trained embeddings are merged into ``llava/`` (peft ``merge_and_unload``) and the LM is frozen;
    without it the adapter is kept beside the base. ``allow_partial`` exports what loaded (the rest stays
    random); ``on_load`` sees the load reports of ``folder`` before anything is written."""
    model = load_checkpoint(folder, allow_partial=allow_partial)
    if on_load is not None:
        on_load(model.load_reports)
    config = model.config
    if merge and hasattr(model.mllm, "peft_config"):
        model.mllm = model.mllm.merge_and_unload()
        config.trainable.language_model = "frozen"
        config.trainable.token_embeddings = "frozen"
        apply_trainability(model)
    model.base_vocab = len(model.tokenizer)
    config.mllm.source = "llava"
    config.segmenter.checkpoint = None

    def write_llava(tmp: Path) -> None:
        target = tmp / "llava"
        target.mkdir()
        model.llava.config.save_pretrained(target)
        save_file(clean_base_state(model.llava), target / "model.safetensors", metadata={"format": "pt"})
        model.tokenizer.save_pretrained(target)

    return save_checkpoint(model, out, write_extra=write_llava)
