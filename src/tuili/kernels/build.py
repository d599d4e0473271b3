"""Build tuili's C++ kernels with PyTorch's extension builder, once per install, cached per machine.

`make run`, `make test` and `python -m tuili.kernels` build them at set-up; elsewhere the first
kernel call builds them, saying so first. The build folder is keyed by the source, the torch and
Python versions, the CPU and the install's own path, so two installs (a checkout and a CI clone, two
venvs) never rebuild each other's objects. Builds are serialised by an `flock` that the kernel
releases when its holder dies, so a build killed mid-way (Ctrl-C, a timeout, a restarted worker)
never leaves a lock for later processes to wait on: PyTorch's own lock file, which does outlive a
killed build, is removed by whoever holds the flock next. Without a compiler, or on a CPU without
AVX2, tuili says so once and every op takes its PyTorch path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
NAME = "tuili_kernels"
CFLAGS, LDFLAGS = ["-O3", "-fopenmp", "-std=c++17"], ["-fopenmp"]


def cpu_id() -> str:
    """The CPU's model name and feature flags (from /proc/cpuinfo), else the platform's processor name."""
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    return flags or platform.processor()


def _has_avx2() -> bool:
    return "avx2" in cpu_id() or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cache_dir() -> Path:
    """This install's build folder: a hash of the sources, torch, Python, the CPU and the install's path."""
    key = hashlib.sha256()
    for src in sorted(CSRC.glob("*.[ch]*")):
        key.update(src.read_bytes())
    for part in (torch.__version__, sys.version, cpu_id(), str(CSRC.resolve()), sys.prefix):
        key.update(part.encode() + b"\0")
    root = Path(os.environ.get("TUILI_CACHE", Path.home() / ".cache" / "tuili"))
    return root / "kernels" / key.hexdigest()[:16]


def is_built(directory: Path, name: str = NAME) -> bool:
    return (directory / f"{name}.so").is_file()


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold this build folder's flock (waiting, with a word, while another process builds), with any
    lock file PyTorch's builder left behind when a build was killed removed."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: PyTorch's own lock only
        yield
        return
    with open(directory / ".tuili-build.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"tuili: waiting for another process to finish building the kernels in {directory}",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)  # torch's baton: only a dead build leaves it here
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compile_extension(name: str, sources: list[Path], directory: Path, quiet: bool = False) -> ModuleType:
    """Build (if needed) and import the extension `name` from `sources` in `directory`, under its lock.
    Says before a build that it is building, and after it how long it took (unless `quiet`)."""
    from torch.utils.cpp_extension import load

    with build_lock(directory):
        building = not is_built(directory, name)
        if building and not quiet:
            print("tuili: building tuili's CPU kernels (2-3 minutes, once) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = load(
            name=name,
            sources=[str(s) for s in sources],
            build_directory=str(directory),
            verbose=False,
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
        )
        if building and not quiet:
            print(
                f"tuili: built the kernels in {time.perf_counter() - start:.0f} s ({directory})",
                file=sys.stderr,
                flush=True,
            )
    return module


@cache
def extension() -> ModuleType | None:
    """The compiled module, or None (fallback) where the CPU has no AVX2 or the build failed."""
    if not _has_avx2():
        warnings.warn("tuili: this CPU has no AVX2; quantized layers use the PyTorch fallback", stacklevel=2)
        return None
    try:
        return compile_extension(NAME, SOURCES, cache_dir())
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, or the build failed
        warnings.warn(
            f"tuili: C++ kernels unavailable ({str(e).splitlines()[0][:200]}); "
            "quantized layers use the PyTorch fallback",
            stacklevel=2,
        )
        return None


def main() -> int:
    """`python -m tuili.kernels`: build the kernels now (set-up), and say how long it took."""
    directory, start = cache_dir(), time.perf_counter()
    built = is_built(directory)
    ext = extension()
    if ext is None:
        print("tuili's CPU kernels are not available here: every op takes its PyTorch path")
    elif built:
        print(f"tuili's CPU kernels: already built (ISA: {ext.isa()}; {directory})")
    else:
        print(f"tuili's CPU kernels: built in {time.perf_counter() - start:.0f} s (ISA: {ext.isa()}; {directory})")
    return 0
