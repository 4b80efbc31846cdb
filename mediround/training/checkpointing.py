"""Training checkpoints without pickle: tensors in safetensors, structure and scalars in JSON.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN`` written under a hidden temporary name and
renamed when complete, so a final name always holds a whole checkpoint::

    model/                      the model engineer's save_checkpoint (what infer/eval load)
    optimizer.safetensors/.json the optimizer state_dict (tensors / tagged JSON structure)
    optimizer-rank<R>.*         under DeepSpeed ZeRO: each process's partition of the optimizer state
                                (its fp32 master weights and moments), same format
    scheduler.json              the LR scheduler state_dict
    rng-rank<R>.json/.safetensors  python, numpy and torch (and CUDA) RNG states of each process
    trainer_state.json          step, data position, world size, recipe hash (written last)

With ``checkpoint.keep_best``, ``checkpoints/best`` holds the MediRound checkpoint (the format of a
step's ``model/``, loadable wherever a ``--model`` folder is) of the best validation so far, with
``best.json`` inside (step, metric, track, rounds, value; covered by its manifest). It is written under
``.best.tmp`` and swapped in by renames; a run killed between the two renames finds the previous best
under ``.best.old`` and puts it back on its next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mediround.atomic import write_json
from mediround.errors import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.safetensors"
BEST = "best"
BEST_RECORD = "best.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def temporary_folder(checkpoints: Path, step: int) -> Path:
    """The hidden name a checkpoint is written under before its rename."""
    return checkpoints / f".{checkpoint_name(step)}.tmp"


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (final name and a trainer state), oldest first."""
    found = []
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and (entry / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1][1] if found else None


def remove_temporary(checkpoints: Path) -> None:
    """Delete half-written checkpoints left by a killed run; a best checkpoint retired by a swap that was
    cut off before its replacement got the name (``publish``) is put back first."""
    retired_best = checkpoints / f".{BEST}.old"
    if retired_best.is_dir() and not (checkpoints / BEST).exists():
        os.replace(retired_best, checkpoints / BEST)
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
                shutil.rmtree(entry, ignore_errors=True)


def publish(temporary: Path, final: Path) -> None:
    """Make a finished temporary folder visible under its final name (fsync, then one rename). A folder
    already there is renamed to ``.NAME.old`` first and deleted only once the new one has the name."""
    for path in temporary.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    retired = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
    os.replace(temporary, final)
    _fsync_folder(final.parent)
    shutil.rmtree(retired, ignore_errors=True)


def read_best(checkpoints: Path) -> dict | None:
    """The ``best.json`` of ``checkpoints/best`` (None when there is no best checkpoint)."""
    path = checkpoints / BEST / BEST_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read: {error}") from None


def write_best(checkpoints: Path, save_model: Callable[[Path, Callable[[Path], None]], Any], record: dict) -> Path:
    """Replace ``checkpoints/best`` by the checkpoint ``save_model(folder, write_extra)`` writes, with
    ``record`` as its ``best.json``: written under ``.best.tmp``, then published."""
    staging = checkpoints / f".{BEST}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = staging / BEST
    save_model(written, lambda folder: write_json(folder / BEST_RECORD, record))
    final = checkpoints / BEST
    publish(written, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def remove_best(checkpoints: Path) -> None:
    """Delete the best checkpoint of an earlier attempt (a run that starts from step 0 keeps its own)."""
    for name in (BEST, f".{BEST}.old"):
        shutil.rmtree(checkpoints / name, ignore_errors=True)


def prune(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; older ones are renamed away before deletion."""
    for _, path in list_checkpoints(checkpoints)[:-keep_last]:
        retired = path.with_name(f".{path.name}.old")
        os.replace(path, retired)
        shutil.rmtree(retired, ignore_errors=True)


def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts with str/int keys, lists, tuples, tensors, scalars) into JSON + tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            name = path or "root"
            tensors[name] = node.detach().cpu().contiguous()
            return {"__tensor__": name}
        if isinstance(node, dict):
            return {"__dict__": [[key, encode(value, f"{path}/{key}")] for key, value in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [encode(value, f"{path}/{i}") for i, value in enumerate(node)]}
        if isinstance(node, list):
            return [encode(value, f"{path}/{i}") for i, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise CheckpointError(f"cannot store {type(node).__name__} at state path '{path}' without pickle")

    return encode(state, ""), tensors


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``."""
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__tuple__" in structure:
            return tuple(unflatten_state(value, tensors) for value in structure["__tuple__"])
        return {key: unflatten_state(value, tensors) for key, value in structure["__dict__"]}
    if isinstance(structure, list):
        return [unflatten_state(value, tensors) for value in structure]
    return structure


def save_state(folder: Path, name: str, state: Any) -> None:
    """``name.json`` (structure) and, when there are tensors, ``name.safetensors``."""
    structure, tensors = flatten_state(state)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure), encoding="utf-8")


def load_state(folder: Path, name: str) -> Any:
    json_path = folder / f"{name}.json"
    tensor_path = folder / f"{name}.safetensors"
    try:
        structure = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
        return unflatten_state(structure, tensors)
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{json_path}: cannot read saved state: {error}") from None


def rng_state() -> dict:
    """Every random generator a training step can consume, as JSON-able data and tensors."""
    numpy_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_trainer_state(folder: Path) -> dict:
    try:
        return json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / TRAINER_STATE}: cannot read: {error}") from None


def save_trainable(model: torch.nn.Module, folder: Path) -> None:
    """The trainable parameters, exactly (dtype and values), by name: what resume restores."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(folder / TRAINABLE))


def load_trainable(model: torch.nn.Module, folder: Path) -> None:
    """Copy saved trainable parameters into ``model``; a name or shape mismatch is a ``CheckpointError``."""
    path = folder / TRAINABLE
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read: {error}") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        differing = sorted(set(tensors) ^ set(params))[:3]
        raise CheckpointError(f"{path}: trainable parameters differ from the model's (e.g. {differing})")
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                raise CheckpointError(f"{path}: parameter '{name}' has shape {tuple(tensors[name].shape)}, "
                                      f"the model {tuple(param.shape)}")
            param.copy_(tensors[name])


def zero_optimizer_state(zero: Any) -> dict:
    """A DeepSpeed ZeRO-1/2 optimizer's state_dict (this process's partition) as plain data: its loss
    scaler becomes its scalar settings and the parameter slice mappings (rebuilt by the optimizer itself)
    are left out, so that ``save_state`` stores it without pickle."""
    state = dict(zero.state_dict())
    state["loss_scaler"] = {key: value for key, value in vars(state["loss_scaler"]).items()
                            if value is None or isinstance(value, (bool, int, float, str))}
    state.pop("param_slice_mappings", None)
    return state


def load_zero_optimizer_state(zero: Any, state: dict, rank: int, world_size: int) -> None:
    """Load ``zero_optimizer_state`` of this process's partition into a ZeRO optimizer built the same way,
    fp32 master weights included."""
    scaler = zero.loss_scaler
    for key, value in state["loss_scaler"].items():
        setattr(scaler, key, value)
    state = {**state, "loss_scaler": scaler, "param_slice_mappings": zero._param_slice_mappings}
    partitions = [state if index == rank else None for index in range(world_size)]
    zero.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)


def write_checkpoint_files(
    folder: Path,
    model: torch.nn.Module | None,
    optimizer_state: dict | None,
    scheduler_state: dict | None,
    rank: int,
    optimizer_name: str = "optimizer",
) -> None:
    """This process's share of a checkpoint in the (temporary) ``folder``: rank 0 writes the model,
    optimizer and scheduler (under ZeRO every rank its ``optimizer_name`` partition); every rank writes
    its RNG state."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        save_trainable(model, folder)
    if optimizer_state is not None:
        save_state(folder, optimizer_name, optimizer_state)
    if scheduler_state is not None:
        save_state(folder, "scheduler", scheduler_state)
    save_state(folder, f"rng-rank{rank}", rng_state())


def write_trainer_state(folder: Path, state: dict) -> None:
    write_json(folder / TRAINER_STATE, state)


def _to_lists(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_lists(item) for item in value]
    return value


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
