"""The kernels' build: keyed by the install, serialised by a lock that dies with its holder, so a
build killed mid-way never makes the next process wait forever."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuili.kernels import build

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
PROBE = (  # pybind11 alone: the same build path as the kernels', without compiling torch's headers twice
    "#include <pybind11/pybind11.h>\nint probe() { return 42; }\n"
    'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("probe", &probe); }\n'
)


def builder(source: Path, directory: Path) -> list[str]:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from tuili.kernels.build import compile_extension
        module = compile_extension("probe", [Path({str(source)!r})], Path({str(directory)!r}))
        print("probe", module.probe())
    """)
    return [sys.executable, "-c", code]


@needs_compiler
def test_a_build_killed_mid_way_does_not_block_the_next_process(tmp_path):
    source, directory = tmp_path / "probe.cpp", tmp_path / "build"
    source.write_text(PROBE)
    first = subprocess.Popen(
        builder(source, directory), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not (directory / "lock").exists():  # PyTorch's lock: the build has started
        assert time.monotonic() < deadline and first.poll() is None, "the first build never started"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the builder, ninja and the compiler, mid-way
    first.wait()
    assert (directory / "lock").exists()  # what used to make every later process wait forever
    second = subprocess.run(builder(source, directory), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "probe 42" in second.stdout
    assert "building tuili's CPU kernels" in second.stderr and "built the kernels in" in second.stderr
    again = subprocess.run(builder(source, directory), capture_output=True, text=True, timeout=120)
    assert "probe 42" in again.stdout and "building" not in again.stderr  # built once


def test_a_second_process_waits_for_the_lock_and_says_so(tmp_path):
    import fcntl

    directory = tmp_path / "build"
    directory.mkdir()
    (directory / "lock").touch()  # a stale lock left by a killed build
    code = (
        f"import sys\nfrom pathlib import Path\nfrom tuili.kernels.build import build_lock\n"
        f"print('ready', file=sys.stderr, flush=True)\n"
        f"with build_lock(Path({str(directory)!r})):\n    print('held', Path({str(directory)!r}, 'lock').exists())"
    )
    with open(directory / ".tuili-build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        waiting = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert waiting.stderr.readline().strip() == "ready"  # imported (slow on a loaded host), about to lock
        time.sleep(1.0)
        assert waiting.poll() is None  # it waits while the lock is held
    waiting.wait(timeout=60)  # then read through the same buffered files readline used (communicate
    out, err = waiting.stdout.read(), waiting.stderr.read()  # reads the raw pipes, losing what they hold)
    assert "waiting for another process" in err and out.strip() == "held False"


def test_the_build_folder_is_private_to_the_install(monkeypatch, tmp_path):
    here = build.cache_dir()
    assert build.cache_dir() == here
    monkeypatch.setattr(build.sys, "prefix", "/another/venv")
    assert build.cache_dir() != here
    monkeypatch.undo()
    copy = shutil.copytree(build.CSRC, tmp_path / "checkout" / "csrc")  # the same sources, installed elsewhere
    monkeypatch.setattr(build, "CSRC", copy)
    assert build.cache_dir() != here
