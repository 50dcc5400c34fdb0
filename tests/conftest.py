"""Shared fixtures for the torchfx_eff test suite.

- TORCHFX_EFF_CACHE_DIR points at a fresh temporary directory for the whole session (the CPU device-spec
  microbenchmark and calibration caches land there, never in the user's home).
- The CPU device spec is pinned to fixed, realistic numbers (measured once on a quiet 2-core AMD EPYC): the real
  microbenchmark (torchfx_eff.cost.devices.measured_cpu) is noisy on a shared or loaded machine (FLOP/s readings
  vary by >10x between runs), and the cost model's decisions must not depend on it in CI. test_cost.py runs the real
  microbenchmark once on its own.
- Every test starts and ends with a clean Dynamo cache and an empty torchfx_eff report, and a fixed seed.
- The `gpu` marker tags tests that need CUDA. Without CUDA, Triton kernels run under TRITON_INTERPRET=1.
"""
import logging
import os
import shutil
import tempfile

import pytest
import torch

_CACHE_DIR = tempfile.mkdtemp(prefix="torchfx_eff_test_cache_")
os.environ["TORCHFX_EFF_CACHE_DIR"] = _CACHE_DIR
# The backend must not pick up a developer's environment by accident.
for _name in [k for k in os.environ if k.startswith("TORCHFX_EFF_") and k != "TORCHFX_EFF_CACHE_DIR"]:
    del os.environ[_name]

# Without a GPU, Triton kernels run in Triton's interpreter; it is chosen when kernels are decorated, so before
# torchfx_eff is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchfx_eff
from torchfx_eff.cost import devices

PINNED_CPU = devices.DeviceSpec(
    name="cpu:pinned-for-tests", type="cpu",
    flops={"float32": 1.5e11, "bfloat16": 2.0e11, "float16": 2.5e9},
    bandwidth=3.5e10, launch_s=2.8e-6,
    efficiency={"dense_float32": (1.0, 0.6), "dense_bfloat16": (1.0, 0.52), "dense_float16": (1.0, 0.6),
                "int8pack": (0.385, 0.487), "int4pack": (0.3, 0.365), "sdpa_cpu": (0.58, 1.0), "elementwise": (1.0, 1.0)},
    custom_op_s=0.0,  # decisions in tests stay independent of Python dispatch speed; test_cost checks the term
)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    # torch's structured-trace logger emits thousands of DEBUG records per compile; keep them out of pytest's
    # captured logs so that a failure report stays readable
    logging.getLogger("torch.__trace").propagate = False


@pytest.fixture(autouse=True, scope="session")
def _pinned_cpu_spec():
    saved = devices._cpu_spec
    devices._cpu_spec = PINNED_CPU
    yield PINNED_CPU
    devices._cpu_spec = saved


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean_state():
    torch._dynamo.reset()
    torchfx_eff.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
    torchfx_eff.reset()


@pytest.fixture
def cache_dir():
    return _CACHE_DIR


@pytest.fixture
def spec_named(monkeypatch):
    """Register a hand-made DeviceSpec under a name (for this test only), so that Config(device=name) costs with it
    end to end."""
    from torchfx_eff import cost

    def register(name, spec):
        monkeypatch.setitem(cost.SPECS, name, lambda: spec)
        return name

    return register
