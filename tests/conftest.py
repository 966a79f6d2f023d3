"""Shared fixtures: a seeded RNG and ``xp``, the array library a test runs on.

Tests written against ``xp`` run on NumPy always and again on CuPy (marker
``gpu``) where CuPy sees a CUDA device, so the GPU runs the same assertions.
"""

import numpy as np
import pytest

from autograd.backend import cupy_available


def _cupy_module():
    import cupy

    return cupy


@pytest.fixture(params=[
    pytest.param("numpy", id="cpu"),
    pytest.param("cupy", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is not available here"),
    ]),
])
def xp(request):
    """numpy, or cupy on a machine with a GPU."""
    return np if request.param == "numpy" else _cupy_module()


@pytest.fixture
def rng():
    """A NumPy Generator with a fixed seed, so every test run draws the same inputs."""
    return np.random.default_rng(1234)


def pytest_collection_modifyitems(config, items):
    """MPI tests run only under mpirun (see tests/mpi and .ci/run); skip them in a plain pytest run."""
    import os

    under_mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    if under_mpi:
        return
    skip = pytest.mark.skip(reason="MPI test: runs under mpirun in .ci/run")
    for item in items:
        if "mpi" in item.keywords:
            item.add_marker(skip)
