"""Build tuili's C++ kernels on first use with PyTorch's extension builder, cached per machine.

The build directory is keyed by the source, the torch version and the CPU, so a cache copied to
another machine (or a new torch) is rebuilt rather than trusted. Without a compiler, or on a CPU
without AVX2, tuili says so once and every op takes its PyTorch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
DISABLE_ENV = "TUILI_KERNELS"  # "0" forces the PyTorch fallback everywhere (tests run both paths)


def _cpu_id() -> str:
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    return flags or platform.processor()


def _has_avx2() -> bool:
    return "avx2" in _cpu_id() or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cache_dir() -> Path:
    key = hashlib.sha256()
    for src in sorted(CSRC.glob("*.[ch]*")):
        key.update(src.read_bytes())
    key.update(torch.__version__.encode() + sys.version.encode() + _cpu_id().encode())
    root = Path(os.environ.get("TUILI_CACHE", Path.home() / ".cache" / "tuili"))
    return root / "kernels" / key.hexdigest()[:16]


@cache
def extension() -> ModuleType | None:
    """The compiled module, or None (fallback) when disabled, unsupported or the build failed."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    if not _has_avx2():
        warnings.warn("tuili: this CPU has no AVX2; quantized layers use the PyTorch fallback", stacklevel=2)
        return None
    from torch.utils.cpp_extension import load

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="tuili_kernels", sources=[str(s) for s in SOURCES], build_directory=str(build),
                    extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, or the build failed
        warnings.warn(f"tuili: C++ kernels unavailable ({str(e).splitlines()[0][:200]}); "
                      "quantized layers use the PyTorch fallback", stacklevel=2)
        return None
