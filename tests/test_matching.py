"""Matchers: every spelling of a linear layer, and the misses (with reasons) for what cannot be taken."""
import pytest
import torch
import torch.nn.functional as F
from helpers import compiled, matched, sites, sqnr_ref

import torchfx_eff
from torchfx_eff.kernels.int8_weight_only import quantize_per_channel

K, N = 256, 512


class Spelled(torch.nn.Module):
    """x times a [K, N] parameter, spelled several ways (GPT-2's Conv1D is the addmm one)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w_kn = torch.nn.Parameter(torch.randn(K, N) / K ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(N))

    def forward(self, x):
        if self.how == "operator":
            return x @ self.w_kn
        if self.how == "method":
            return x.matmul(self.w_kn)
        if self.how == "torch.matmul":
            return torch.matmul(x, self.w_kn)
        if self.how == "addmm":
            return torch.addmm(self.b, x.view(-1, K), self.w_kn)
        raise ValueError(self.how)


def _dequantized_reference(w_nk, x, bias=None):
    q, s = quantize_per_channel(w_nk)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    return ref if bias is None else ref + bias.double()


@pytest.mark.parametrize("how,op", [("operator", "matmul"), ("method", "matmul"), ("torch.matmul", "matmul")])
def test_matmul_spellings_are_one_linear_site(how, op):
    model = Spelled(how).to(torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, linear="off")(x)
    [s] = matched("linear")
    assert s.op == op and s.hints == {"M": 1, "N": N, "K": K}
    assert torch.equal(out, ref)


@pytest.mark.parametrize("how", ["operator", "addmm"])
def test_kn_layout_sites_compute_x_times_w(how):
    """A [K, N] weight must be quantized per output column; compare with the fp64 product of the dequantized
    transpose, so a layout mix-up (N and K swapped) cannot pass."""
    torch.manual_seed(0)
    model = Spelled(how).to(torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model)(x)
    [s] = matched("linear")
    assert s.hints == {"M": 1, "N": N, "K": K}
    assert s.status == "rewritten", s.reason
    bias = model.b if how == "addmm" else None
    assert sqnr_ref(_dequantized_reference(model.w_kn.t(), x, bias), out) >= 30.0


def test_linear_with_runtime_weight_is_missed_with_reason():
    class RuntimeWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(N, K))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    model = RuntimeWeight().to(torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model)(x)
    assert matched("linear") == []
    [miss] = sites("linear", "missed")
    assert "computed at run time" in miss.reason
    assert torch.equal(out, ref)


def test_matmul_of_two_activations_is_not_a_linear_site():
    def f(a, b):
        return torch.relu(a @ b)

    with torch.no_grad():
        compiled(f)(torch.randn(4, 8), torch.randn(8, 3))
    assert sites("linear") == []


def test_addmm_with_beta_is_missed_with_reason():
    class Beta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(K, N))
            self.b = torch.nn.Parameter(torch.randn(N))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w, beta=0.5)

    model = Beta().to(torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model)(x)
    [miss] = sites("linear", "missed")
    assert "beta" in miss.reason
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kwargs,needle", [({"dropout_p": 0.25}, "dropout_p=0.25")])
def test_sdpa_with_dropout_is_missed_with_reason(kwargs, needle):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    q = torch.randn(1, 2, 8, 16)
    with torch.no_grad():
        out = compiled(f)(q, q, q)
    assert out.shape == q.shape
    [miss] = sites("attention", "missed")
    assert miss.op == "sdpa" and needle in miss.reason


def test_sdpa_argument_forms_are_matched():
    """Positional and keyword arguments, a mask, 3-D (unbatched) inputs, GQA and an explicit scale."""
    def f(q, k, v, mask, q3, kg, vg):
        a = F.scaled_dot_product_attention(q, k, v, mask)
        b = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=0.5)
        c = F.scaled_dot_product_attention(q3, q3, q3)
        d = F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)
        return a, b, c, d

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    mask = torch.randn(8, 8)
    q3 = torch.randn(4, 8, 16)
    kg, vg = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 32)
    args = (q, k, v, mask, q3, kg, vg)
    with torch.no_grad():
        ref = f(*args)
        out = compiled(f)(*args)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    found = {(s.hints["H"], s.hints["Hkv"], s.hints["Dv"], s.hints["B"]) for s in matched("attention")}
    assert len(matched("attention")) == 4 and sites("attention", "missed") == []
    assert (4, 2, 32, 2) in found  # GQA: 4 query heads, 2 key/value heads, value dim 32
    assert (4, 4, 16, 1) in found  # unbatched 3-D input: B = 1


def test_the_graph_given_to_the_backend_is_not_modified():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.GELU(), torch.nn.Linear(N, K)).to(torch.bfloat16)
    seen = {}
    inner = torchfx_eff.backend(torchfx_eff.Config(inner="eager"))

    def spy(gm, example_inputs):
        seen["before"] = (gm.code, dict(gm.named_buffers()).keys(), [n.target for n in gm.graph.nodes])
        fn = inner(gm, example_inputs)
        seen["after"] = (gm.code, dict(gm.named_buffers()).keys(), [n.target for n in gm.graph.nodes])
        seen["out"] = gm(*example_inputs)
        return fn

    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.compile(model, backend=spy)(x)
        ref = model(x)
    assert seen["before"] == seen["after"]
    assert any(s.status == "rewritten" for s in matched("linear"))  # a rewrite happened, on a copy
    assert torch.equal(seen["out"][0], ref)  # the given graph still computes the original
