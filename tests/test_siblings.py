"""Horizontal fusion of sibling linears (Q/K/V, gate/up): one linear over the concatenated weights, then a split."""
import pytest
import sympy
import torch
import torch.nn.functional as F
import functools

import helpers
from helpers import (
    BIG,
    SMALL,
    count_calls,
    first_output,
    fused_away,
    linear_modules,
    make_model,
    matched,
    sites,
    sqnr_ref,
)

import torchfx_eff

compiled = functools.partial(helpers.compiled, fuse_siblings=True)  # always fused; "auto" (the default) below
from torchfx_eff import passes
from torchfx_eff.config import Config
from torchfx_eff.report.records import FUSED_COPY_PREFIX
from torchfx_eff.kernels.int8_weight_only import quantize_per_channel
from torchfx_eff.passes import siblings

# members per group in one decoder layer, independent of the pass: q/k/v then gate/up
DECODER_GROUPS = {"llama": [3, 2], "qwen2": [3, 2], "bert": [3], "gpt2": []}


def _run(model, *inputs, **config):
    with torch.no_grad():
        ref = first_output(model(*inputs))
        out = first_output(compiled(model, **config)(*inputs))
    return ref, out


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "gpt2"])
def test_siblings_are_fused_and_outputs_match(family):
    model = make_model(family, SMALL, torch.float32)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad(), count_calls(model) as counts:
        model(ids)
    ref, out = _run(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # exact math: fp32 rounding at most
    groups = DECODER_GROUPS[family] * SMALL["layers"]
    fused = sites("siblings")
    assert sorted(int(s.op.split(" x")[1]) for s in fused) == sorted(groups)  # no false grouping (GPT-2: none)
    assert fused_away() == sum(n - 1 for n in groups)
    assert len(matched("linear")) == counts["linear"] - fused_away()
    for s in fused:
        assert (s.status, s.chosen) == ("rewritten", "concat")
        assert s.op.startswith("linear x") and s.hints["K"] == SMALL["hidden"]
    # the fused linear is an ordinary site at the first member's location, N the sum of the members'
    linear_at = {}
    for s in matched("linear"):
        linear_at.setdefault((s.graph_id, s.location), []).append(s.hints["N"])
    assert all(s.hints["N"] in linear_at[s.graph_id, s.location] for s in fused)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qkv_of_a_static_cache_decode_is_fused(family):
    """The value projection's piece is copied into a StaticCache in place (index_copy_): a read, so q/k/v fuse."""
    import transformers as T

    model = make_model(family, SMALL, torch.float32)
    ids = torch.randint(0, 128, (1, 6))
    logits = []
    for step in (model, compiled(model)):
        cache = T.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids, past_key_values=cache)
            logits.append(step(ids[:, -1:], past_key_values=cache, cache_position=torch.tensor([6])).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    groups = DECODER_GROUPS[family] * SMALL["layers"]
    assert sorted(int(s.op.split(" x")[1]) for s in sites("siblings")) == sorted(groups)


def test_auto_fuses_a_group_whose_fused_linear_packs_and_frees_its_copy():
    """fuse_siblings="auto" (the default) at M = 1 with static shapes: int8 packs every fused linear, so each group
    fuses, its concatenated copy is freed once packed, and the logits are those of the unfused int8 compile."""
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 1))
    outs, reports = [], []
    for fuse in ("auto", False):
        torch._dynamo.reset()
        torchfx_eff.reset()
        backend = torchfx_eff.backend(Config(inner="eager", linear=("int8_weight_only",), output_linear_8bit=False,
                                             fuse_siblings=fuse))
        with torch.no_grad():
            outs.append(torch.compile(model, backend=backend, dynamic=False)(ids).logits)
        reports.append(torchfx_eff.last_report())
    fused = sites("siblings", report=reports[0])
    assert sorted(int(s.op.split(" x")[1]) for s in fused) == sorted(DECODER_GROUPS["llama"] * BIG["layers"])
    assert all((s.status, s.chosen) == ("rewritten", "concat") for s in fused)
    copies = [s for s in sites("weight", report=reports[0]) if s.op.startswith(FUSED_COPY_PREFIX)]
    assert copies and all(s.status == "released" for s in copies)
    assert not sites("siblings", report=reports[1])
    torch.testing.assert_close(outs[0], outs[1])


def test_auto_fuses_in_a_graph_with_symbolic_rows_whose_prefill_keeps_the_original():
    """A dynamic-length compile (as generate's second call gets): each fused linear dispatches on rows, int8 for
    decode and the original above. The original branch runs the member linears on their own parameters, so no
    graph reads a concatenated copy as is: the groups stay fused, the copies are released once packed, and a prefill
    equals eager's bit for bit."""
    model = make_model("llama", BIG, torch.bfloat16)
    backend = torchfx_eff.backend(Config(inner="eager", linear=("int8_weight_only",), output_linear_8bit=False))
    cm = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        decode_ids, prefill_ids = torch.randint(0, 128, (1, 2)), torch.randint(0, 128, (1, 300))
        decode, prefill = cm(decode_ids).logits, cm(prefill_ids).logits
        assert torch.equal(prefill, model(prefill_ids).logits)
        assert sqnr_ref(model(decode_ids).logits, decode) >= 25.0
    fused = sites("siblings")
    assert len(fused) == len(DECODER_GROUPS["llama"]) * BIG["layers"]
    assert all(s.status == "rewritten" and sympy.sympify(s.dims["M"]).free_symbols for s in fused)
    dispatched = [s for s in sites("linear", "rewritten") if s.regimes]
    assert len(dispatched) >= len(fused)  # the fused sites among them
    assert all([r["chosen"] for r in s.regimes.values()] == ["int8_weight_only", "original"] for s in dispatched)
    copies = [s for s in sites("weight") if s.op.startswith(FUSED_COPY_PREFIX)]
    assert len(copies) == len(fused) and all(s.status == "released" for s in copies)


def test_auto_leaves_a_group_unfused_where_its_fused_linear_keeps_the_original():
    """On the small fp32 model the original wins every linear: under "auto" the fused linears would read their
    concatenated copies as is, beside the members, so each group stays unfused and its record says why."""
    model = make_model("llama", SMALL, torch.float32)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad(), count_calls(model) as counts:
        ref = model(ids).logits
    with torch.no_grad():
        out = helpers.compiled(model, fuse_siblings="auto")(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    kept = sites("siblings")
    assert sorted(int(s.op.split(" x")[1]) for s in kept) == sorted(DECODER_GROUPS["llama"] * SMALL["layers"])
    assert all(s.status == "kept" and s.reason.startswith("not fused: the fused linear read") for s in kept)
    assert len(matched("linear")) == counts["linear"]
    assert not [s for s in sites("weight") if s.op.startswith(FUSED_COPY_PREFIX)]
    assert not any(siblings._COPIES.get(p) for p in model.parameters())  # no concatenation stays cached


def test_qkv_record_names_members_and_counts_the_copy():
    model = make_model("qwen2", SMALL, torch.float32)  # q/k/v have biases in Qwen2
    _run(model, torch.randint(0, 128, (1, 4)))
    attn = model.model.layers[0].self_attn
    members = [attn.q_proj, attn.k_proj, attn.v_proj]
    n = [m.out_features for m in members]
    [rec] = [s for s in sites("siblings") if s.op == "linear x3" and "layers_modules_0_" in s.packed[0]]
    assert f"N={sum(n)} ({'+'.join(map(str, n))})" in rec.reason and "copy adds" in rec.reason
    nbytes = sum(m.weight.nbytes + m.bias.nbytes for m in members)
    assert rec.weight_bytes == (nbytes, nbytes)  # members read before; the copy the graph holds after
    assert len(rec.packed) == 6 and all(("q_proj" in p) + ("k_proj" in p) + ("v_proj" in p) == 1 for p in rec.packed)
    assert rec.hints == {"M": 4, "N": sum(n), "K": SMALL["hidden"]}


class _Pair(torch.nn.Module):
    def __init__(self, bias_b=True, view_a=None, return_both=False, cache_a=False, scale_a_=False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 16), torch.nn.Linear(32, 24, bias=bias_b)
        self.view_a, self.return_both, self.scale_a_ = view_a, return_both, scale_a_
        self.register_buffer("cache", torch.zeros(5, 3, 16) if cache_a else None)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.view_a:
            a = a.view(self.view_a)
        if self.scale_a_:
            a.mul_(2)
        if self.cache is not None:  # a static KV cache's write: the piece is the source, the cache is mutated
            self.cache.index_copy_(0, torch.tensor([1, 3]), a)
            a = self.cache
        return (a, b) if self.return_both else a.sum() * b


@pytest.mark.parametrize("case, fused", [
    ({}, 1),
    ({"bias_b": False}, 0),  # bias on one member only
    ({"view_a": (-1,)}, 0),  # a view that merges the split dimension: invalid on a slice of the fused output
    ({"view_a": (2, 3, 4, 4)}, 1),  # a view that only splits the last dimension is fine
    ({"return_both": True}, 0),  # the caller may expect the contiguous tensors the linears returned
    ({"cache_a": True}, 1),  # copied into a buffer in place: read, not written
    ({"scale_a_": True}, 0),  # written in place
])
def test_fusion_conditions(case, fused):
    torch.manual_seed(0)
    model = _Pair(**case).eval()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model)(x)
    for r, o in zip(*((ref, out) if case.get("return_both") else ((ref,), (out,)))):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    assert len(sites("siblings")) == fused
    assert len(matched("linear")) == 2 - fused


def _hand_built(dtype_b):
    """x -> linear(x, a), linear(x, b) -> sum + sum, with weight b of dtype_b: a graph no model produces (the
    linear of b would not run), so it is built by hand, with the fake values Dynamo would attach."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = torch.nn.Module()
    root.a, root.b = torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(8, 32, dtype=dtype_b))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a, b = (g.call_function(torch._C._nn.linear, (x, g.get_attr(name))) for name in ("a", "b"))
    g.output(g.call_function(torch.add, (g.call_method("sum", (a,)), g.call_method("sum", (b,)))))
    with FakeTensorMode():
        x.meta["example_value"] = torch.empty(4, 32)
        a.meta["example_value"] = torch.empty(4, 16)
        b.meta["example_value"] = torch.empty(4, 8, dtype=dtype_b)
    return torch.fx.GraphModule(root, g)


@pytest.mark.parametrize("dtype_b, fused", [(torch.float64, 0), (torch.float32, 1)])
def test_different_weight_dtype_is_not_fused(dtype_b, fused):
    gm = _hand_built(dtype_b)
    with torch.no_grad():
        records = siblings.fuse(passes.GraphInfo(gm, [torch.randn(4, 32)]), 0)
    assert len(records) == fused
    linears = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    assert len(linears) == 2 - fused


def test_fused_linear_equals_separate_linears_to_rounding():
    """The rewrite in isolation: one GEMM over the concatenation, split, against each member's own F.linear."""
    torch.manual_seed(0)
    x = torch.randn(5, 7, 64)
    ws, bs = [torch.randn(n, 64) for n in (64, 32, 32)], [torch.randn(n) for n in (64, 32, 32)]
    fused = torch.split(F.linear(x, torch.cat(ws), torch.cat(bs)), [64, 32, 32], dim=-1)
    for piece, w, b in zip(fused, ws, bs):
        ref = F.linear(x.double(), w.double(), b.double())
        separate = F.linear(x, w, b)
        # both are fp32 GEMMs of the same dot products: equally close to the fp64 reference
        assert (piece.double() - ref).abs().max() <= 4 * (separate.double() - ref).abs().max() + 1e-6


def test_in_place_update_of_a_member_after_compile_is_seen():
    """The graph reads a copy: updating k_proj (not the first member) in place must run the unoptimized graph,
    and a recompile makes a fresh copy."""
    model = make_model("llama", SMALL, torch.float32)
    ids = torch.randint(0, 128, (1, 6))
    cm = compiled(model)
    with torch.no_grad():
        cm(ids)
        assert sites("siblings") and not sites("linear", "rewritten")  # fused sites kept: the graph still reads copies
        model.model.layers[1].self_attn.k_proj.weight.mul_(-2)
        ref, out = model(ids).logits, cm(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert any("parameters changed after compile" in s.reason for s in sites("graph", "fallback"))
    torch._dynamo.reset()
    torchfx_eff.reset()
    with torch.no_grad():
        out = compiled(model)(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sites("graph") == []


def test_int8_on_the_fused_site():
    """int8 weight-only applies to the concatenated weight; the report counts each member parameter once and the
    copy in the after."""
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 1))
    ref, out = _run(model, ids, linear=("int8_weight_only",))
    assert sqnr_ref(ref, out) >= 20.0
    attn = model.model.layers[0].self_attn
    qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    [group] = [s for s in sites("siblings") if s.op == "linear x3" and "layers_modules_0_" in s.packed[0]]
    # the siblings record names the concatenation that the fused linear site repacked
    [site] = [s for s in matched("linear") if s.packed and s.packed[0] == group.copy]
    assert (site.status, site.chosen) == ("rewritten", "int8_weight_only"), site.reason
    assert site.hints["N"] == sum(w.shape[0] for w in qkv) and site.packed[0].startswith("_torchfx_eff_cat_")
    q, scales = quantize_per_channel(torch.cat(qkv))  # independent: quantize the concatenation ourselves
    assert site.weight_bytes == (sum(w.nbytes for w in qkv), q.nbytes + scales.nbytes)
    assert group.weight_bytes == (sum(w.nbytes for w in qkv),) * 2
    # totals: each linear's parameter once before; after, int8 weights and bf16 scales of every linear (the same
    # bytes whether quantized one by one or concatenated; the fp copies of the fused groups were repacked)
    assert all(s.status == "rewritten" for s in matched("linear")), [s.reason for s in matched("linear")]
    weights = [m.weight for m in linear_modules(model)]
    int8 = sum(w.numel() + 2 * w.shape[0] for w in weights)
    assert torchfx_eff.last_report().weight_bytes() == (sum(w.nbytes for w in weights), int8)


def test_prefill_and_decode_graphs_share_one_copy():
    model = make_model("llama", SMALL, torch.float32)
    cm = compiled(model)
    with torch.no_grad():
        cm(torch.randint(0, 128, (1, 1)))
        cm(torch.randint(0, 128, (1, 2)))
    by_graph = {}
    for s in sites("siblings"):
        by_graph.setdefault(s.graph_id, []).append(tuple(s.packed))
    assert len(by_graph) == 2 and len(set(map(tuple, by_graph.values()))) == 1
    q = model.model.layers[0].self_attn.q_proj.weight
    assert len(siblings._COPIES[q]) == 1  # one concatenation of q/k/v for both graphs


def test_dynamic_lengths_reuse_the_fused_graph():
    model = make_model("llama", SMALL, torch.float32)
    cm = compiled(model)
    with torch.no_grad():
        for length in (3, 5, 7, 9):
            ids = torch.randint(0, 128, (1, length))
            torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    graphs = sorted({s.graph_id for s in sites()})
    assert len(graphs) == 2  # static, then one dynamic graph: the pass adds no guard that specializes the length
    dynamic = [s for s in sites("siblings") if s.graph_id == graphs[1]]
    assert len(dynamic) == 2 * SMALL["layers"]
    assert all(sympy.sympify(s.dims["M"]).free_symbols for s in dynamic)


def test_inductor_compiles_the_fused_graph():
    model = make_model("llama", SMALL, torch.float32)
    ref, out = _run(model, torch.randint(0, 128, (2, 5)), inner="inductor")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(sites("siblings", "rewritten")) == 2 * SMALL["layers"] and sites("graph") == []


def test_autograd_on_is_not_fused():
    model = make_model("llama", SMALL, torch.float32)
    ids = torch.randint(0, 128, (1, 4))
    out = compiled(model)(ids).logits
    out.sum().backward()
    assert sites("siblings") == []
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None


@pytest.mark.parametrize("off", [{"fuse_siblings": False}, {"linear": "off"}])
def test_config_off(off):
    model = make_model("llama", SMALL, torch.float32)
    ref, out = _run(model, torch.randint(0, 128, (1, 4)), **off)
    assert sites("siblings") == [] and torch.equal(out, ref)


def test_config_validation():
    with pytest.raises(ValueError, match="fuse_siblings"):
        Config(fuse_siblings="yes")
    assert Config.from_env({"TORCHFX_EFF_FUSE_SIBLINGS": "0"}).fuse_siblings is False
    with pytest.raises(ValueError, match="TORCHFX_EFF_FUSE_SIBLINGS"):
        Config.from_env({"TORCHFX_EFF_FUSE_SIBLINGS": "maybe"})


def test_stage_failure_leaves_the_graph_unoptimized(monkeypatch):
    def boom(*_):
        raise RuntimeError("injected")

    monkeypatch.setattr(passes, "fuse_siblings", boom)
    model = make_model("llama", SMALL, torch.float32)
    ref, out = _run(model, torch.randint(0, 128, (1, 4)))
    assert torch.equal(out, ref)
    [rec] = torchfx_eff.last_report().sites
    assert (rec.kind, rec.status) == ("graph", "fallback") and "'siblings'" in rec.reason


class _TwoLevels(torch.nn.Module):
    """A group on x, and a group on the output of one of its members (low-rank projections, MLA-like)."""

    def __init__(self):
        super().__init__()
        self.down, self.side = torch.nn.Linear(32, 8), torch.nn.Linear(32, 16)
        self.up1, self.up2 = torch.nn.Linear(8, 32), torch.nn.Linear(8, 24)

    def forward(self, x):
        h = self.down(x)
        return self.up1(h).sum(-1, keepdim=True) * self.up2(h) + self.side(x).mean()


def test_group_reading_a_fused_members_output():
    torch.manual_seed(0)
    model = _TwoLevels().eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        ref, out = model(x), compiled(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert sorted(s.hints["K"] for s in sites("siblings")) == [8, 32]
    assert len(matched("linear")) == 2
