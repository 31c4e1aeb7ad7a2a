import os
import zlib

# Four host devices for the sharding tests; must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _has_cuda_target():
    try:
        from jax_flashkda.ops import cuda_unavailable_reason
    except ImportError:
        return False
    return cuda_unavailable_reason() is None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a Hopper GPU with the CUDA target")
    gpu_ok = _has_cuda_target()
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    skip_multi = pytest.mark.skip(reason="needs two or more GPUs")
    for item in items:
        if "gpu" in item.keywords and not gpu_ok:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and len(gpus) < 2:
            item.add_marker(skip_multi)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def poisoned_cuda_outputs(request, monkeypatch):
    """GPU tests run with every CUDA result prefilled with NaN (see kda_cuda_ffi.cc), so an
    element the kernels leave unwritten fails instead of passing on stale memory."""
    if request.node.get_closest_marker("gpu") or request.node.get_closest_marker("multi_gpu"):
        monkeypatch.setenv("JAX_FLASHKDA_POISON_OUTPUTS", "1")
