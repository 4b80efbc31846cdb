"""Where the files a data file names live: relative to a root folder, never outside it unless allowed."""

from __future__ import annotations

import os
import re
from pathlib import Path

_DRIVE = re.compile(r"[A-Za-z]:")


class RootGuard:
    """Says whether relative paths stay inside ``root``; resolved folders are cached, so a data file with
    millions of paths in a few folders costs one ``lstat`` per path."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._real_root = os.path.realpath(self.root)
        self._real_dirs: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return real == self._real_root or real.startswith(self._real_root.rstrip(os.sep) + os.sep)

    def reason(self, relative: str) -> str | None:
        """Why ``relative`` may not be used (absolute, leaving the root via ``..`` or a symlink), or None."""
        if relative.startswith(("/", "\\")) or _DRIVE.match(relative):
            return f"absolute path '{relative}' is not allowed (paths are relative to the root {self.root})"
        folder, name = os.path.split(relative)
        real_dir = self._real_dirs.get(folder)
        if real_dir is None:
            real_dir = self._real_dirs[folder] = os.path.realpath(os.path.join(self._real_root, folder))
        target = os.path.join(real_dir, name)
        if name in ("", ".", "..") or os.path.islink(target):
            target = os.path.realpath(target)
        if not self._inside(target):
            return f"path '{relative}' leaves the root {self.root}"
        return None


def relocate(relative: str, old_root: Path, new_root: Path) -> str:
    """The file ``relative`` under ``old_root``, written relative to ``new_root`` (POSIX separators)."""
    if Path(os.path.abspath(old_root)) == Path(os.path.abspath(new_root)):
        return relative
    absolute = os.path.abspath(os.path.join(old_root, relative))
    return Path(os.path.relpath(absolute, os.path.abspath(new_root))).as_posix()
