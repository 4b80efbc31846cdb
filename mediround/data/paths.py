"""Where the files a data file names live: relative to a root folder, never outside it unless allowed."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


def outside_root_reason(root: Path, relative: str) -> str | None:
    """Why ``relative`` may not be used under ``root`` (absolute, or escaping via ``..`` or a symlink), else None."""
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute():
        return f"absolute path '{relative}' is not allowed (paths are relative to the root {root})"
    resolved_root = root.resolve()
    target = (resolved_root / relative).resolve()
    if not target.is_relative_to(resolved_root):
        return f"path '{relative}' leaves the root {root}"
    return None


def relocate(relative: str, old_root: Path, new_root: Path) -> str:
    """The same file as ``relative`` under ``old_root``, written relative to ``new_root`` (POSIX separators)."""
    if Path(os.path.abspath(old_root)) == Path(os.path.abspath(new_root)):
        return relative
    absolute = os.path.abspath(os.path.join(old_root, relative))
    return Path(os.path.relpath(absolute, os.path.abspath(new_root))).as_posix()
