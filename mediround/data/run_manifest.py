"""The run manifest of a predictions folder (``DIR/run.json``): which data, model and settings produced it.

``mediround infer`` writes it when a run starts and again, with its end time, when the run finishes;
``mediround eval`` reads it to find the data of a folder, and refuses data whose SHA-256 differs from the
one recorded (``--force`` overrides). Metric Parquet files carry it as file metadata, so a baseline says
which data it was scored on.

Fields: ``data`` (absolute path), ``data_sha256`` (the data file's bytes), ``data_files_sha256`` (the
bytes of the images and masks it names, so that a mask changed in place is caught too), ``model``
(absolute checkpoint folder), ``model_manifest_sha256`` (SHA-256 of the checkpoint's ``manifest.json``, which hashes every weight file),
``betas``, ``teacher_forcing``, ``generate``, ``mediround_version``, ``started``, ``finished`` (UTC, ISO 8601;
``finished`` is null while the run is going or after a kill), ``shards`` (written with ``finished``: the
completion mark of each process of the run's last attempt: ``rank``, ``world_size`` as torch.distributed
saw it, ``machine_rank``, ``dialogues`` predicted).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mediround.data.dialogue import Dialogue
from mediround.errors import DataError

MANIFEST_FILE = "run.json"
PREDICTIONS_SUFFIX = "-predictions"
_CHUNK = 1 << 20


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _update_with_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)


def data_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a data file; of a data folder (SA-Med2D), of every file's relative path and bytes in
    sorted order, so renaming, adding or changing any file changes it."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            _update_with_file(digest, file)
    else:
        _update_with_file(digest, path)
    return digest.hexdigest()


def referenced_files_sha256(dialogues: Sequence[Dialogue]) -> str:
    """SHA-256 over the bytes of each dialogue's image and ground-truth masks, in dialogue and round order
    (each file read once; a round without a mask, or a file that is not there, counts as such). It follows
    the bytes, not the paths: data moved to another folder or machine keeps it, a mask rewritten in place
    or two masks swapped change it."""
    digest = hashlib.sha256()
    per_file: dict[Path, bytes] = {}
    for dialogue in dialogues:
        digest.update(dialogue.id.encode("utf-8") + b"\0")
        masks = [dialogue.mask_path(number) for number in range(1, len(dialogue.rounds) + 1)]
        for path in (dialogue.image_path, *masks):
            if path is None:
                digest.update(b"no mask")
                continue
            if path not in per_file:
                file_digest = hashlib.sha256()
                if path.is_file():
                    _update_with_file(file_digest, path)
                    per_file[path] = file_digest.digest()
                else:
                    per_file[path] = b"missing"
            digest.update(per_file[path])
    return digest.hexdigest()


def model_manifest_sha256(model_folder: str | os.PathLike) -> str | None:
    """SHA-256 of a checkpoint's ``manifest.json`` (None for a folder without one)."""
    manifest = Path(model_folder) / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def default_predictions_folder(data: str | os.PathLike) -> Path:
    """Where ``mediround infer DATA`` writes without ``--out``: ``<data name>-predictions`` in the current
    folder (``dialogues.jsonl`` -> ``./dialogues-predictions``)."""
    path = Path(data)
    stem = path.name if path.is_dir() else path.stem
    return Path(f"{stem}{PREDICTIONS_SUFFIX}")


def read_manifest(folder: str | os.PathLike) -> dict:
    """The run manifest of a predictions folder; ``DataError`` when it has none or it is unreadable."""
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(path), None, None, "no run manifest: not a folder written by `mediround infer`; "
                        "give the data file (mediround eval DATA --predictions DIR)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(str(path), None, None, f"unreadable run manifest: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("data"), str):
        raise DataError(str(path), None, "data", "the run manifest names no data file")
    return manifest


def find_predictions_folder(where: str | os.PathLike = ".") -> Path:
    """The one ``*-predictions`` folder with a run manifest in ``where`` (what ``mediround eval`` scores
    without DATA or ``--predictions``); ``DataError`` when there is none or several."""
    found = sorted(p for p in Path(where).glob(f"*{PREDICTIONS_SUFFIX}") if (p / MANIFEST_FILE).is_file())
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) if found else "none"
        raise DataError(str(Path(where).resolve()), None, None, f"expected one predictions folder written by "
                        f"`mediround infer` (*{PREDICTIONS_SUFFIX}/), found {listed}: pass --predictions DIR")
    return found[0]


def check_data_matches(
    manifest: dict, folder: str | os.PathLike, data: str | os.PathLike, dialogues: Sequence[Dialogue], force: bool
) -> dict[str, str]:
    """This data's SHA-256 and that of the images and masks its ``dialogues`` name, after checking both
    against the ones the predictions were made from (a manifest older than ``data_files_sha256`` is checked
    by the data file only); ``DataError`` when one differs unless ``force``."""
    digests = {"data_sha256": data_sha256(data), "data_files_sha256": referenced_files_sha256(dialogues)}
    for key, digest in digests.items():
        recorded = manifest.get(key)
        if recorded is not None and recorded != digest and not force:
            what = "SHA-256" if key == "data_sha256" else "SHA-256 of the images and masks it names"
            raise DataError(str(data), None, None, f"{what} {digest[:12]} differs from {recorded[:12]} of "
                            f"{manifest['data']}, the data {Path(folder) / MANIFEST_FILE} says these predictions were "
                            "made from: scoring them against other data gives meaningless scores (--force to score anyway)")
    return digests
