"""Matchers: every spelling of a linear layer, and the misses (with reasons) for what cannot be taken."""
import pytest
import torch
import torch.nn.functional as F
from helpers import compiled, found_sites, matched, sites, sqnr_ref

import torchfx_eff
from torchfx_eff.kernels.int8_weight_only import quantize_per_channel
from torchfx_eff.passes import Miss

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
        if self.how == "mm":
            return torch.mm(x, self.w_kn)
        if self.how == "einsum":
            return torch.einsum("bk, kn -> bn", x, self.w_kn)
        if self.how == "tensordot":
            return torch.tensordot(x, self.w_kn, dims=1)
        raise ValueError(self.how)


def _dequantized_reference(w_nk, x, bias=None):
    q, s = quantize_per_channel(w_nk)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    return ref if bias is None else ref + bias.double()


@pytest.mark.parametrize("how,op", [("operator", "matmul"), ("method", "matmul"), ("torch.matmul", "matmul"),
                                    ("mm", "matmul"), ("einsum", "matmul"), ("tensordot", "matmul")])
def test_matmul_spellings_are_one_linear_site(how, op):
    model = Spelled(how).to(torch.bfloat16)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, linear="off")(x)
    [s] = matched("linear")
    assert s.op == op and s.hints == {"M": 1, "N": N, "K": K}
    assert torch.equal(out, ref)


@pytest.mark.parametrize("how", ["operator", "addmm", "mm", "einsum", "tensordot"])
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


class Transposed(torch.nn.Module):
    """x times the transpose of an [N, K] parameter, as Falcon's FalconLinear (`input @ self.weight.T`) and others
    spell it."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w_nk = torch.nn.Parameter(torch.randn(N, K) / K ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(N))

    def forward(self, x):
        w = self.w_nk
        return {"T": lambda: x @ w.T, "mT": lambda: x @ w.mT, "t()": lambda: x @ w.t(),
                "torch.t": lambda: torch.matmul(x, torch.t(w)), "transpose": lambda: x @ w.transpose(0, 1),
                "transpose(-1, -2)": lambda: x.matmul(w.transpose(-1, -2)), "permute": lambda: x @ w.permute(1, 0),
                "addmm": lambda: torch.addmm(self.b, x.view(-1, K), w.T),
                "einsum": lambda: torch.einsum("...k,nk->...n", x, w),
                "einsum, weight first": lambda: torch.einsum("nk,blk->bln", w, x)}[self.how]()


@pytest.mark.parametrize("how", ["T", "mT", "t()", "torch.t", "transpose", "transpose(-1, -2)", "permute", "addmm", "einsum",
                                 "einsum, weight first"])
def test_matmul_by_a_transposed_parameter_is_a_linear_site_quantized_per_row(how):
    """The parameter is [N, K] as F.linear's: quantized per row (its output channels), checked against the fp64
    product of the dequantized rows, so that a layout mix-up cannot pass."""
    torch.manual_seed(0)
    model = Transposed(how).to(torch.bfloat16)
    x = torch.randn(1, 3, K, dtype=torch.bfloat16) if how != "addmm" else torch.randn(3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model)(x)
    [s] = matched("linear")
    assert s.op == "linear" and s.hints == {"M": 3, "N": N, "K": K}
    assert s.status == "rewritten", s.reason
    assert sqnr_ref(_dequantized_reference(model.w_nk, x, model.b if how == "addmm" else None), out) >= 30.0


@pytest.mark.parametrize("x_shape", [(3, K), (1, 3, K)])
def test_parameter_times_transposed_x_is_a_linear_site(x_shape):
    """Mamba's dt_proj spelling, W @ x.transpose(-1, -2): F.linear(x, W) transposed."""
    torch.manual_seed(0)
    model = Transposed("T").to(torch.bfloat16)
    model.forward = lambda x: model.w_nk @ x.transpose(-1, -2)
    x = torch.randn(*x_shape, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model)(x)
    [s] = matched("linear")
    assert s.op == "linear" and s.hints == {"M": 3, "N": N, "K": K}
    assert s.status == "rewritten", s.reason
    assert out.shape == (*x_shape[:-2], N, 3)
    assert sqnr_ref(_dequantized_reference(model.w_nk, x).transpose(-1, -2), out) >= 30.0


class UntakenProducts(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn(K, N) / K ** 0.5)
        self.mha = torch.nn.MultiheadAttention(K, 4, add_zero_attn=True, batch_first=True)

    def forward(self, x):
        if self.how == "W.T @ x.T":  # (x @ W).T: the parameter on the left, transposed
            return self.w.T @ x[0].T
        return self.mha(x, x, x, need_weights=False)[0]  # add_zero_attn: a form passes/mha.py leaves as one call


@pytest.mark.parametrize("how,op,param", [("W.T @ x.T", "matmul", "w"),
                                         ("mha", "multi_head_attention_forward", "in_proj_weight")])
def test_products_by_a_parameter_in_other_forms_are_missed_with_reason(how, op, param):
    model = UntakenProducts(how).to(torch.bfloat16).eval()
    x = torch.randn(1, 3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(model)(x)
    [miss] = sites("linear")
    assert miss.status == "missed" and miss.op == op
    assert "in a form that no linear spelling takes" in miss.reason and param in miss.reason


def test_matmul_by_a_transposed_activation_is_not_a_linear_site():
    def f(a, b):
        return torch.relu(a @ b.T)

    with torch.no_grad():
        compiled(f)(torch.randn(4, 8), torch.randn(3, 8))
    assert sites("linear") == []


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


# Eager attention: a zoo of spellings. Each is one site; a rewrite (SDPA on CPU) or the kept original computes
# what the eager module computes.
B, H, L, D = 2, 4, 8, 16
S = D ** -0.5
NEG_INF = float("-inf")


class EagerAttention(torch.nn.Module):
    """Eager attention spelled by `fn(module, q, k, v, mask=, pad=, dead=)`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, q, k, v, mask, pad, dead):
        return self.fn(self, q, k, v, mask=mask, pad=pad, dead=dead)


def _attention_inputs(lk=L):
    """q, k, v; a float mask; `pad` masks the last two keys; `dead` also masks every key of one query row."""
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, lk, D), torch.randn(B, H, lk, D)
    pad = (torch.arange(lk) >= lk - 2).expand(B, 1, L, lk).clone()
    dead = pad.clone()
    dead[1, 0, 3] = True
    return q, k, v, torch.randn(B, 1, L, lk), pad, dead


def _bmm(m, q, k, v, **x):  # (B·H, L, D) operands
    q3, k3, v3 = (t.flatten(0, 1) for t in (q, k, v))
    return torch.bmm(torch.softmax(torch.bmm(q3, k3.permute(0, 2, 1)) * S, dim=-1), v3).view(B, H, L, D)


def _in_place(m, q, k, v, mask, **x):  # Falcon's eager attention scales its scores in place
    scores = q @ k.mT
    scores /= D ** 0.5
    scores += mask
    return torch.softmax(scores, -1) @ v


def _baddbmm_3d(m, q, k, v, **x):  # ALiBi added inside the score product, all over (B·H, L, D)
    q3, k3, v3 = (t.flatten(0, 1) for t in (q, k, v))
    alibi = torch.arange(L, dtype=q.dtype).expand(B * H, 1, L)
    scores = alibi.baddbmm(batch1=q3, batch2=k3.transpose(1, 2), beta=1.0, alpha=S)
    return torch.bmm(F.softmax(scores, dim=-1), v3).view(B, H, L, D)


def _bloom(m, q, k, v, mask, **x):  # BLOOM: baddbmm over (B·H, L, D), viewed to (B, H, L, L) for its mask and softmax
    q3, k3, v3 = (t.flatten(0, 1) for t in (q, k, v))
    alibi = torch.linspace(0, 1, B * H * L).view(B * H, 1, L)
    scores = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=S)
    probs = F.softmax(scores.view(B, H, L, -1) + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(m.drop(probs).view(B * H, L, -1), v3).view(B, H, L, D)


def _gpt2_upcast(m, q, k, v, mask, **x):  # GPT-2's reorder_and_upcast_attn: baddbmm into an ignored buffer (beta 0)
    scores = torch.empty(B * H, L, L)
    scores = torch.baddbmm(scores, q.reshape(-1, L, D).float(), k.transpose(-1, -2).reshape(-1, D, L), beta=0, alpha=S)
    return torch.matmul(F.softmax(scores.reshape(B, H, L, L) + mask, dim=-1).type(v.dtype), v)


# name -> (spelling, key length, what the site must hold)
TAKEN = {
    "gpt2_upcast": (_gpt2_upcast, L, {"scale": S, "masks": 1}),
    "baddbmm_3d": (_baddbmm_3d, L, {"scale": S, "masks": 1, "H": B * H, "rewritten": False}),
    "bloom_merged_heads": (_bloom, L, {"scale": S, "masks": 2}),
    "matmul_transpose": (lambda m, q, k, v, **x: torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * S, dim=-1) @ v,
                         L, {"scale": S, "k_transposed": True}),
    "operator_mT_div": (lambda m, q, k, v, **x: F.softmax(q @ k.mT / D ** 0.5, dim=-1) @ v, L, {"scale": S}),
    # matched; not asserted rewritten: SDPA's fused CPU kernel takes only 4-D inputs
    "bmm_3d": (_bmm, L, {"scale": S, "k_transposed": True, "H": B * H, "rewritten": False}),
    "einsum": (lambda m, q, k, v, **x: torch.einsum("bhqk,bhkd->bhqd", torch.softmax(
        torch.einsum("bhqd,bhkd->bhqk", q, k) * S, -1), v), L, {"scale": S, "k_transposed": False}),
    "einsum_ellipsis_kT_p_second": (lambda m, q, k, v, **x: torch.einsum("...jd,...ij->...id", v, torch.softmax(
        torch.einsum("...id,...dj->...ij", q, k.transpose(-2, -1)) * S, -1)), L, {"scale": S, "k_transposed": True}),
    "in_place_div_and_add": (_in_place, L, {"scale": S, "masks": 1}),
    "q_scaled_first": (lambda m, q, k, v, **x: torch.softmax((q * S) @ k.transpose(-2, -1), -1) @ v, L, {"scale": 1.0}),
    "q_and_k_scaled_first": (lambda m, q, k, v, **x: torch.softmax((q * S ** 0.5) @ (k * S ** 0.5).mT, -1) @ v,
                             L, {"scale": 1.0}),
    "masked_fill_neg_inf": (lambda m, q, k, v, pad, **x: (q @ k.mT * S).masked_fill(pad, NEG_INF).softmax(-1) @ v,
                            L, {"scale": S, "fill": NEG_INF}),
    "masked_fill_finfo_min_dead_row": (lambda m, q, k, v, dead, **x: torch.softmax(torch.masked_fill(
        q @ k.mT * S, dead, torch.finfo(q.dtype).min), -1) @ v, L, {"fill": torch.finfo(torch.float32).min}),
    "mask_then_masked_fill": (lambda m, q, k, v, mask, pad, **x: torch.softmax(
        (q @ k.mT * S + mask).masked_fill(pad, NEG_INF), -1) @ v, L, {"masks": 1, "fill": NEG_INF}),
    "softmax_fp32_upcast": (lambda m, q, k, v, mask, **x: F.softmax(q @ k.mT * S + mask, dim=-1,
                                                                   dtype=torch.float32).to(q.dtype) @ v,
                            L, {"scale": S, "masks": 1}),
    "dropout_in_eval": (lambda m, q, k, v, mask, **x: F.dropout(m.drop(F.softmax(q @ k.mT * S + mask, dim=-1)),
                                                               p=0.1, training=False) @ v, L, {"masks": 1}),
    "cross_attention": (lambda m, q, k, v, mask, pad, **x: torch.softmax(
        (q @ k.mT * S + mask).masked_fill(pad, NEG_INF), -1) @ v, 12, {"Lk": 12, "masks": 1, "fill": NEG_INF}),
    "softcap": (lambda m, q, k, v, mask, **x: torch.softmax(torch.tanh(q @ k.mT * S / 50.0) * 50.0 + mask, -1) @ v,
                L, {"scale": S, "softcap": 50.0, "masks": 1}),
    "softcap_method_reciprocals": (lambda m, q, k, v, pad, **x: torch.softmax(
        ((q @ k.mT) * (S * 0.02)).tanh().div(0.02).masked_fill(pad, NEG_INF), -1) @ v,
        L, {"scale": S, "softcap": 50.0, "fill": NEG_INF}),
}


def _the_site(found):
    [site] = [s for s in found if not isinstance(s, Miss)]
    return site


@pytest.mark.parametrize("name", TAKEN)
def test_eager_attention_spellings_are_one_site_and_outputs_match(name):
    fn, lk, want = TAKEN[name]
    model, args = EagerAttention(fn).eval(), _attention_inputs(lk)
    with torch.no_grad(), found_sites() as found:
        ref = model(*args)
        out = compiled(model)(*args)
    site, [record] = _the_site(found), sites("attention")
    assert site.op == "eager" and site.size("Lq") == L and site.size("Lk") == want.get("Lk", lk)
    assert site.scale == pytest.approx(want.get("scale", S), rel=1e-6)
    assert site.softcap == want.get("softcap")
    masks = site.mask if isinstance(site.mask, tuple) else (() if site.mask is None else (site.mask,))
    assert len(masks) == want.get("masks", 0)
    assert (site.mask_fill[1] if site.mask_fill else None) == want.get("fill")
    if "k_transposed" in want:
        assert site.k_transposed == want["k_transposed"]
    assert site.size("H") == want.get("H", H)
    if site.softcap is None and want.get("rewritten", True):
        assert (record.status, record.chosen) == ("rewritten", "sdpa_cpu"), record.reason
        assert record.sqnr_db >= 100.0
    elif site.softcap is not None:  # matched, but no candidate on CPU computes a softcap: the original stays
        assert record.status == "kept", record.reason
        [sdpa] = [c for c in record.candidates if c.name == "sdpa_cpu"]
        assert not sdpa.applicable and "softcap" in sdpa.reason
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sqnr_ref(ref, out) >= 100.0


def test_masked_fill_with_finfo_min_keeps_the_uniform_average_of_a_fully_masked_row():
    fn, lk, _ = TAKEN["masked_fill_finfo_min_dead_row"]
    q, k, v, mask, pad, dead = _attention_inputs(lk)
    with torch.no_grad():
        out = compiled(EagerAttention(fn))(q, k, v, mask, pad, dead)
    [record] = sites("attention")
    assert record.status == "rewritten", record.reason
    torch.testing.assert_close(out[1, :, 3], v[1].mean(dim=-2), rtol=1e-5, atol=1e-5)  # every key weighs the same


SOFTCAPS = {
    "gemma2_order": lambda q, k, mask: torch.tanh(q @ k.mT * S / 30.0) * 30.0 + mask,
    "reciprocals_as_methods": lambda q, k, mask: ((q @ k.mT) * (S / 30.0)).tanh().div(1 / 30.0) + mask,
    "tanh_alone": lambda q, k, mask: torch.tanh(q @ k.mT * S) + mask,
    "scaled_again_after_tanh": lambda q, k, mask: torch.tanh(q @ k.mT * S / 30.0) * 30.0 * 0.5 + mask,
}


@pytest.mark.parametrize("name", SOFTCAPS)
def test_softcap_folds_into_a_cap_and_a_scale_that_reproduce_the_original(name):
    """post·tanh(pre·s) is taken as softcap·tanh(scale·s / softcap); no CPU candidate computes a softcap, so
    compute the site's math here from the fields it holds."""
    fn = SOFTCAPS[name]
    model = EagerAttention(lambda m, q, k, v, mask, **x: torch.softmax(fn(q, k, mask), -1) @ v)
    q, k, v, mask, pad, dead = _attention_inputs()
    with torch.no_grad(), found_sites() as found:
        ref = model(q, k, v, mask, pad, dead)
        compiled(model)(q, k, v, mask, pad, dead)
    site = _the_site(found)
    assert site.softcap is not None and site.mask is not None and site.mask_fill is None
    scores = site.softcap * torch.tanh(site.scale * (q @ k.mT) / site.softcap) + mask
    torch.testing.assert_close(torch.softmax(scores, -1) @ v, ref, rtol=1e-5, atol=1e-5)


def test_softcap_costs_the_unfused_original_more():
    from dataclasses import replace

    from torchfx_eff.cost import formulas
    from torchfx_eff.cost.devices import DeviceSpec

    fn, lk, _ = TAKEN["softcap"]
    with torch.no_grad(), found_sites() as found:
        compiled(EagerAttention(fn))(*_attention_inputs(lk))
    site = _the_site(found)
    spec = DeviceSpec(name="t", type="cpu", flops={"float32": 1e11}, bandwidth=1e10, launch_s=1e-6)
    capped, plain = (formulas.evaluate(formulas.attention_unfused(s, spec), s.hints)
                     for s in (site, replace(site, softcap=None)))
    assert capped > plain


# name -> (spelling, the words the miss must give)
MISSED = {
    "mask_added_before_the_scale": (lambda m, q, k, v, mask, **x: torch.softmax((q @ k.mT + mask) * S, -1) @ v,
                                    "a mask or bias added before the scale"),
    "masked_fill_before_the_scale": (lambda m, q, k, v, pad, **x: torch.softmax(
        (q @ k.mT).masked_fill(pad, NEG_INF) * S, -1) @ v, "masked_fill before the scale"),
    "mask_before_the_softcap": (lambda m, q, k, v, mask, **x: torch.softmax(
        torch.tanh(q @ k.mT * S / 50.0 + mask) * 50.0, -1) @ v, "a mask or bias added before the softcap (tanh)"),
    "softmax_over_queries": (lambda m, q, k, v, **x: torch.softmax(q @ k.mT * S, dim=-2) @ v,
                             "softmax over dim -2, not the last"),
    "masked_fill_with_a_run_time_value": (lambda m, q, k, v, mask, pad, **x: torch.softmax(
        (q @ k.mT * S).masked_fill(pad, mask.min()), -1) @ v, "masked_fill with a run-time value"),
    "masked_fill_value_not_low_enough": (lambda m, q, k, v, pad, **x: torch.softmax(
        (q @ k.mT * S).masked_fill(pad, -1e4), -1) @ v, "masked_fill value -10000.0 is neither -inf nor low enough"),
    "two_masked_fills": (lambda m, q, k, v, pad, dead, **x: torch.softmax(
        (q @ k.mT * S).masked_fill(pad, NEG_INF).masked_fill(dead, torch.finfo(q.dtype).min), -1) @ v,
        "more than one masked_fill"),
    "einsum_in_a_heads_second_layout": (lambda m, q, k, v, **x: torch.softmax(torch.einsum(
        "bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2)) * S, -1) @ v,
        "the score einsum 'bqhd,bkhd->bhqk' is not q·kᵀ"),
    "einsum_with_v_transposed": (lambda m, q, k, v, **x: torch.einsum(
        "bhqk,bhdk->bhqd", torch.softmax(q @ k.mT * S, -1), v.mT), "v is given transposed"),
}


@pytest.mark.parametrize("name", MISSED)
def test_eager_attention_that_cannot_be_taken_is_missed_with_a_precise_reason(name):
    fn, why = MISSED[name]
    model, args = EagerAttention(fn).eval(), _attention_inputs()
    with torch.no_grad():
        ref = model(*args)
        out = compiled(model)(*args)
    [record] = sites("attention")
    assert record.status == "missed" and record.op == "eager" and why in record.reason, record.reason
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_sdpa_candidates_take_a_bool_mask_as_sdpa_converts_it():
    """SDPA turns a bool mask into 0 / -inf on every call (three kernels a call on CUDA); sdpa_site converts it in
    the graph instead, where Inductor fuses it with the mask's own ops: the op gets a float mask and returns SDPA's
    output with the bool mask bit for bit, a fully masked row included."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from torchfx_eff.kernels.attention_inputs import site_mask
    from torchfx_eff.kernels.sdpa import sdpa_site

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (5, 7, 7))
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[1, 0, 2] = False  # a row with no key
    assert site_mask(mask, None, q.dtype, additive=True).dtype == q.dtype
    fake = FakeTensorMode().from_tensor(mask)  # as the cost rules hold it for torch's CUDA checks: outside the mode
    assert site_mask(fake, None, torch.bfloat16, additive=True).dtype == torch.bfloat16
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = sdpa_site(q, k, v, mask, None, False, None, False, False, "sdpa_cpu")
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_linear_of_a_parameter_cast_at_run_time_is_missed_naming_it():
    """A router's F.linear(h.float(), W.float()) (GLM-4 MoE, ERNIE 4.5 MoE) keeps the precision the model asks for."""
    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, K))

        def forward(self, x):
            return F.linear(x.float(), self.weight.float())

    model = Router().to(torch.bfloat16)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model)(x)
    [miss] = sites("linear")
    assert miss.status == "missed" and "converted by .float() at run time" in miss.reason and "weight" in miss.reason
    assert torch.equal(out, model(x))
