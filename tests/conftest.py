import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def default_model():
    import tuili

    return tuili.load("default")


@pytest.fixture(params=["kernels", "fallback"])
def kernel_path(request):
    """Runs a test twice: on tuili's C++ kernels (where built) and with the PyTorch fallback forced."""
    from tuili.kernels import ops

    if request.param == "kernels":
        yield request.param
    else:
        with ops.fallback():
            yield request.param
