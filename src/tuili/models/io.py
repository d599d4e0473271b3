"""File helpers for checkpoints: JSON that fails with the file's name, files and folders written atomically.

Everything goes through a temporary name beside the target and one rename, and gets the mode a plain
`open()` or `mkdir()` would give under the user's umask (0644 files and 0755 folders under umask 022):
`mkstemp`'s private 0600 would keep a serving container with another uid from reading the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuili.errors import ModelFormatError


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from e


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def umask() -> int:
    """The process's umask, read without changing it (Linux's /proc; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: Path) -> None:
    """Give a file or folder the mode plain creation would have (0666 or 0777 less the umask)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it becomes `path` in one rename,
    with the ordinary mode. On failure (or Ctrl-C) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        public_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: Path, marker: str = "config.json") -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    An interrupted write (Ctrl-C, crash) leaves `target` as it was and no half folder. An existing
    `target` is replaced only if it holds `marker` (a model folder), so a typo never wipes a folder.
    """
    target = Path(target).absolute()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / marker).exists())):
        raise FileExistsError(f"{target} exists and is not a model folder; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for path in (tmp, *tmp.rglob("*")):  # libraries' own writers (safetensors: 0600) included
            public_mode(path)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary name and a rename, so readers never see half of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
