"""SA-Med2D-20M style folders as single-round referring dialogues (one per mask).

The folder holds ``image2label_*.json`` (image -> list of masks) and/or ``label2image_*.json``
(mask -> image), with paths relative to the JSON's folder or its parent. Masks are named
``<image stem>_<class>_<instance>.png``; the class (underscores -> spaces) becomes the target entity:
"Segment the liver." / "It is [SEG].". The modality is read from the image name where it is
recognisable (SA-Med2D prefixes such as ``ct_``/``mr_``; AMOS cases 1-500 are CT, 501-600 MRI).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats.common import check_path, guard_for
from mediround.errors import DataError

QUERY = "Segment the {entity}."
ANSWER = "It is [SEG]."
MODALITY_PREFIXES = {
    "ct": "CT",
    "mr": "MRI",
    "mri": "MRI",
    "pet": "PET",
    "x": "X-ray",
    "xray": "X-ray",
    "us": "ultrasound",
    "ultrasound": "ultrasound",
    "endoscopy": "endoscopy",
    "dermoscopy": "dermoscopy",
    "fundus": "fundus",
}
AMOS_LAST_CT_CASE = 500
_INSTANCE = re.compile(r"[_-](\d+)$")


def modality_from_name(stem: str) -> str | None:
    """The imaging modality an SA-Med2D image name reveals, or None."""
    lowered = stem.lower()
    amos = re.match(r"amos_(\d+)", lowered)
    if amos:
        return "CT" if int(amos.group(1)) <= AMOS_LAST_CT_CASE else "MRI"
    prefix = re.split(r"[_\-]", lowered, maxsplit=1)[0]
    return MODALITY_PREFIXES.get(prefix)


def class_from_mask_name(mask_stem: str, image_stem: str) -> str | None:
    """``amos_0004_75_inferior_vena_cava_000`` with image ``amos_0004_75`` -> ``inferior vena cava``."""
    for separator in ("_", "--"):
        if mask_stem.startswith(image_stem + separator):
            rest = mask_stem[len(image_stem) + len(separator) :]
            break
    else:
        return None
    rest = _INSTANCE.sub("", rest)
    name = rest.replace("_", " ").strip()
    if not name or name.replace(" ", "").isdigit():
        return None
    return name


def _maps(folder: Path) -> list[Path]:
    patterns = ("image2label*.json", "label2image*.json")
    found = [path for pattern in patterns for path in sorted(folder.glob(pattern))]
    return found or [path for pattern in patterns for path in sorted(folder.glob(f"*/{pattern}"))]


def _read_map(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(str(path), None, None, f"cannot read the SA-Med2D map: {error}") from None
    if not isinstance(data, dict):
        raise DataError(str(path), None, None, "an SA-Med2D map must be a JSON object")
    pairs: dict[str, list[str]] = {}
    for key, value in data.items():
        if (
            path.name.startswith("image2label")
            and isinstance(value, list)
            and all(isinstance(v, str) for v in value)
        ):
            pairs.setdefault(key, []).extend(value)
        elif path.name.startswith("label2image") and isinstance(value, str):
            pairs.setdefault(value, []).append(key)
        else:
            raise DataError(str(path), f"entry {key}", None, "unexpected value type for this map")
    return pairs


def _root_for(map_path: Path, pairs: dict[str, list[str]]) -> Path:
    """The map's folder or its parent: whichever the listed images are relative to."""
    first = next(iter(pairs), None)
    for candidate in (map_path.parent, map_path.parent.parent):
        if first is not None and (candidate / first).exists():
            return candidate
    return map_path.parent


def image_masks(folder: Path) -> list[tuple[Path, Path, str, list[str]]]:
    """(map file, root, image, masks) of every image an SA-Med2D folder's maps list, paths relative to root."""
    maps = _maps(folder)
    if not maps:
        raise DataError(
            str(folder), None, None, "no image2label*.json or label2image*.json found (not an SA-Med2D folder)"
        )
    found: dict[tuple[Path, str], tuple[Path, list[str]]] = {}
    for map_path in maps:
        pairs = _read_map(map_path)
        root = _root_for(map_path, pairs)
        for image, masks in pairs.items():
            listed = found.setdefault((root, image), (map_path, []))[1]
            listed += [mask for mask in masks if mask not in listed]
    return [(map_path, root, image, masks) for (root, image), (map_path, masks) in found.items()]


def read_samed2d(
    folder: str | os.PathLike, allow_outside_root: bool = False
) -> tuple[list[Dialogue], list[DataError], int]:
    """A single-round dialogue per mask of an SA-Med2D folder, problems of skipped masks, the mask count."""
    folder = Path(folder)
    maps = _maps(folder)
    if not maps:
        raise DataError(
            str(folder),
            None,
            None,
            "no image2label*.json or label2image*.json found (not an SA-Med2D folder)",
        )
    dialogues: list[Dialogue] = []
    problems: list[DataError] = []
    seen: set[tuple[Path, str, str]] = set()
    count = 0
    for map_path in maps:
        pairs = _read_map(map_path)
        root = _root_for(map_path, pairs)
        guard = guard_for(root, allow_outside_root)
        for image, masks in pairs.items():
            image_stem = PurePosixPath(image).stem
            for mask in masks:
                if (root, image, mask) in seen:
                    continue
                seen.add((root, image, mask))
                count += 1
                mask_stem = PurePosixPath(mask).stem
                entity = class_from_mask_name(mask_stem, image_stem)
                found = check_path(guard, image, "image") + check_path(guard, mask, "mask")
                if entity is None:
                    found.append(
                        ("mask", f"no class name in '{mask}' (expected <image stem>_<class>_<instance>.png)")
                    )
                if found:
                    problems += [
                        DataError(str(map_path), f"mask {mask}", field, reason) for field, reason in found
                    ]
                    continue
                dialogues.append(
                    Dialogue(
                        id=mask_stem,
                        image=image,
                        rounds=[
                            Round(
                                query=QUERY.format(entity=entity),
                                answer=ANSWER,
                                mask=mask,
                                entity=entity,
                                names_target=True,
                            )
                        ],
                        root=root,
                        modality=modality_from_name(image_stem),
                        source="sa-med2d",
                        item=count,
                    )
                )
    return dialogues, problems, count
