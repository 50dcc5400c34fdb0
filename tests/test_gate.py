"""The numerics gate: SQNR against a hand fp64 computation, budgets, and capture of mutated inputs."""
import copy
import math

import pytest
import torch
from helpers import compiled, matched, sqnr_ref
from torch import fx

from torchfx_eff import gate
from torchfx_eff.kernels import Replacement


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rel_noise", [1e-1, 1e-3, 1e-6])
def test_sqnr_db_matches_hand_computation(dtype, rel_noise):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(37, 5, generator=g, dtype=torch.float64).to(dtype)
    act = (ref.double() + rel_noise * torch.randn(37, 5, generator=g, dtype=torch.float64)).to(dtype)
    expected = sqnr_ref(ref, act)
    if math.isinf(expected):  # noise below the dtype's resolution
        assert gate.sqnr_db(ref, act) == math.inf
    else:
        assert gate.sqnr_db(ref, act) == pytest.approx(expected, abs=1e-9)


def test_sqnr_db_known_values():
    ref = torch.tensor([3.0, -4.0])  # |ref|^2 = 25
    assert gate.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # |noise|^2 = 0.25
    assert gate.sqnr_db(ref, ref * 1.01) == pytest.approx(40.0)
    assert gate.sqnr_db(ref, torch.tensor([3.0, -4.0])) == math.inf
    assert gate.sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert gate.sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    # computed in fp64: a bf16 pair gives the same number as its fp64 values
    a, b = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    assert gate.sqnr_db(a, b) == pytest.approx(sqnr_ref(a.double(), b.double()), abs=1e-9)


def _placeholder_graph():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(x)
    return x


@pytest.mark.parametrize("accuracy,dtype,rel,passes", [
    ("balanced", torch.float32, 0.05, True),     # 26.0 dB >= 20
    ("balanced", torch.float32, 0.2, False),     # 14.0 dB < 20
    ("aggressive", torch.float32, 0.2, True),    # 14.0 dB >= 8
    ("aggressive", torch.float32, 0.5, False),   # 6.0 dB < 8
    ("lossless", torch.float32, 1e-4, False),    # 80 dB < 100 (fp32 rounding level)
    ("lossless", torch.float32, 1e-6, True),     # 120 dB
    ("lossless", torch.bfloat16, 2 ** -6, True),  # 36.1 dB >= 35
    ("lossless", torch.bfloat16, 2 ** -4, False),  # 24.1 dB < 35
])
def test_check_applies_the_budget(accuracy, dtype, rel, passes):
    x = _placeholder_graph()
    value = torch.randn(16, 16).to(dtype)
    # a replacement whose output is value * (1 + rel): SQNR is exactly -20 log10(rel) in exact arithmetic
    rep = Replacement(torch.mul, (x, 1 + rel))
    reference = value
    db, why = gate.check(rep, reference, {x: value}, accuracy)
    assert db == pytest.approx(sqnr_ref(reference, value * (1 + rel)), abs=1e-9)
    assert (why is None) == passes, (db, why)
    if not passes:
        assert "SQNR" in why and repr(accuracy) in why


def test_check_rejects_shape_dtype_and_nonfinite_mismatches():
    x = _placeholder_graph()
    value = torch.randn(4, 4)
    values = {x: value}
    db, why = gate.check(Replacement(torch.Tensor.double, (x,)), value, values, "aggressive")
    assert db == -math.inf and "differs" in why
    db, why = gate.check(Replacement(torch.Tensor.reshape, (x, (16,))), value, values, "aggressive")
    assert db == -math.inf and "differs" in why
    db, why = gate.check(Replacement(torch.Tensor.index_fill, (x, 0, torch.tensor([1]), float("inf"))), value, values,
                         "aggressive")
    assert db == -math.inf and "non-finite" in why
    # non-finite values where the reference has them too are fine: compared on the finite part
    ref = value.index_fill(0, torch.tensor([1]), float("inf"))
    db, why = gate.check(Replacement(torch.Tensor.index_fill, (x, 0, torch.tensor([1]), float("inf"))), ref, values,
                         "balanced")
    assert why is None and db == math.inf


class MutatesInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        x.add_(1)
        return self.lin(x) * 2


def test_capture_does_not_mutate_the_callers_inputs():
    model = MutatesInput()
    gm = fx.symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    x = torch.randn(3, 8)
    before = x.clone()
    sites = {nodes["lin"], nodes["mul"]}
    values = gate.capture(gm, [x], {n: [n] for n in sites})
    assert torch.equal(x, before)  # the graph's add_ ran on a copy
    with torch.no_grad():
        expected_lin = model.lin(before + 1)
    assert set(values) == sites
    torch.testing.assert_close(values[nodes["lin"]][nodes["x"]], before + 1, rtol=0, atol=0)  # as lin read it
    torch.testing.assert_close(values[nodes["lin"]][nodes["lin"]], expected_lin, rtol=0, atol=0)
    torch.testing.assert_close(values[nodes["mul"]][nodes["mul"]], expected_lin * 2, rtol=0, atol=0)


def test_capture_keeps_each_sites_inputs_and_output_only():
    class F(torch.nn.Module):
        def forward(self, a, b):
            c = a @ b
            return torch.relu(c) + 1

    gm = fx.symbolic_trace(F())
    nodes = {n.name: n for n in gm.graph.nodes}
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    values = gate.capture(gm, [a, b], {nodes["matmul"]: [nodes["matmul"]]})
    assert set(values) == {nodes["matmul"]}
    assert set(values[nodes["matmul"]]) == {nodes["matmul"], nodes["a"], nodes["b"]}  # its inputs and output only
    assert torch.equal(values[nodes["matmul"]][nodes["matmul"]], a @ b)
    assert torch.equal(values[nodes["matmul"]][nodes["a"]], a)


class MutateThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(256, 256, bias=False)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_site_reading_an_input_mutated_earlier_is_gated_on_the_mutated_value():
    torch.manual_seed(0)
    model = MutateThenLinear().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        x_eager, x_comp = x.clone(), x.clone()
        ref = model(x_eager)
        out = compiled(model)(x_comp)
    assert torch.equal(x_eager, x_comp)  # mutated exactly once, as in eager
    assert sqnr_ref(ref, out) >= 20.0
    [site] = matched("linear")
    assert site.status == "rewritten", site.reason


class NormThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(256)
        self.lin = torch.nn.Linear(256, 256, bias=False)

    def forward(self, x):
        return self.lin(self.bn(x))


def test_capture_has_no_side_effect_on_module_buffers():
    torch.manual_seed(0)
    model = NormThenLinear().to(torch.bfloat16).train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # eager: one update of the running statistics
        compiled(twin)(x)
    assert matched("linear")[0].status == "rewritten"  # a site was decided, so the gate captured values
    assert torch.equal(twin.bn.running_mean, model.bn.running_mean)
    assert torch.equal(twin.bn.running_var, model.bn.running_var)
    assert torch.equal(twin.bn.num_batches_tracked, model.bn.num_batches_tracked)
