"""The autotuners' timing plumbing (kernels/registry.py) on CPU: the cold copies a config is timed over, and that
each config runs on every copy with its own values; the timing itself is checked on the GPU (tests/test_gpu.py)."""
import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from torchfx_eff.kernels import registry

L2 = 1 << 20


@pytest.mark.parametrize("nbytes,copies", [(1 << 16, 64), (3 << 20, 2), (4 << 20, 1), (16, registry.COLD_COPIES_MAX)])
def test_cold_copies_together_hold_four_l2s_in_fresh_storage(nbytes, copies):
    weight = torch.randn(nbytes // 8, dtype=torch.float32)
    x = torch.randn(nbytes // 8, dtype=torch.float32)
    args = (weight, x, 7, None)
    out = registry.cold_copies(args, L2)
    assert len(out) == copies and out[0] is args
    storages = {t.untyped_storage().data_ptr() for copy in out for t in copy[:2]}
    assert len(storages) == 2 * copies
    for copy in out[1:]:
        assert torch.equal(copy[0], weight) and torch.equal(copy[1], x) and copy[2:] == (7, None)


class _Kernel:
    """Stands for a JITFunction: records each run's arguments; a config with BLOCK 0 is out of resources."""

    def __init__(self):
        self.runs = []
        self.fn = lambda w, x: None  # what Autotuner unwraps to find the Python function

    def run(self, *args, **options):
        if options["BLOCK"] == 0:
            raise OutOfResources(1 << 20, 1 << 16, "shared memory")
        self.runs.append((args, options))


def test_each_config_is_timed_over_every_cold_copy_with_its_values(monkeypatch):
    kernel = _Kernel()
    tuner = registry.DecodeTimedAutotuner(kernel, ["w", "x"], [triton.Config({"BLOCK": 0}), triton.Config({"BLOCK": 8})],
                                          ["x"], reset_to_zero=None, restore_value=None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"L2_cache_size": L2}))
    timed = []

    def bench(calls, quantiles):
        for call in calls:
            call()
        timed.append(len(calls))
        return [1.0] * len(quantiles)

    monkeypatch.setattr(registry, "decode_bench", bench)
    w, x = torch.randn(1 << 14), torch.randn(1 << 14)  # 128 KB: 32 copies hold 4 MB
    assert tuner._bench(w, x, config=tuner.configs[0], grid=(1,)) == [float("inf")] * 3
    assert tuner._bench(w, x, config=tuner.configs[1], grid=(1,)) == [1.0] * 3
    assert timed == [32]
    assert len({args[0].data_ptr() for args, _ in kernel.runs}) == 32
    assert all(options["BLOCK"] == 8 and options["grid"] == (1,) and options["num_warps"] == 4
               for _, options in kernel.runs)
