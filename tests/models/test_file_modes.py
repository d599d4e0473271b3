"""Everything tuili writes gets the mode plain creation would give under the user's umask (written
atomically through mkstemp/mkdtemp, whose private 0600/0700 modes must not leak into the result)."""

import os
import stat

import pytest
from helpers import random_tiny

from tuili.models.io import atomic_file, atomic_write_text, umask


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask and umask() == mask


def test_saved_model_folders_and_files(tmp_path, mask):
    folder = random_tiny().save(tmp_path / "model")
    assert mode(folder) == 0o777 & ~mask
    files = list(folder.iterdir())
    assert files and all(mode(f) == 0o666 & ~mask for f in files), {f.name: oct(mode(f)) for f in files}


def test_atomic_files_and_exports(tmp_path, mask):
    from tuili.pipeline.gguf_export import export_gguf

    atomic_write_text(tmp_path / "report.html", "<html></html>")
    with atomic_file(tmp_path / "data.bin") as tmp:
        tmp.write_bytes(b"\0")
    gguf = export_gguf(random_tiny(), tmp_path / "m.gguf").path
    for path in (tmp_path / "report.html", tmp_path / "data.bin", gguf):
        assert mode(path) == 0o666 & ~mask, (path.name, oct(mode(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "m.gguf", "report.html"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
