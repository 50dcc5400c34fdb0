"""Dynamic shapes: a second sequence length recompiles (automatic dynamic) and sites are matched again."""
import sympy
import torch
from helpers import (
    BIG,
    SMALL,
    LinearStack,
    compiled,
    count_calls,
    make_model,
    matched,
    sites,
    sqnr_ref,
)

import torchfx_eff


def _graph_ids(kind=None):
    return sorted({s.graph_id for s in sites(kind)})


def _is_symbolic(expr: str) -> bool:
    return bool(sympy.sympify(expr).free_symbols)


def test_dynamic_rows_one_graph_serves_every_length():
    torch.manual_seed(0)
    model = LinearStack().to(torch.bfloat16)
    cm = compiled(model)
    with torch.no_grad():
        for rows in (2, 3, 5, 8):
            x = torch.randn(rows, 256, dtype=torch.bfloat16)
            ref, out = model(x), cm(x)
            assert out.shape == ref.shape
            assert sqnr_ref(ref, out) >= 20.0, rows
    graphs = _graph_ids()
    assert len(graphs) == 2  # static first, then one dynamic graph for every later length
    dynamic = [s for s in matched("linear") if s.graph_id == graphs[1]]
    assert len(dynamic) == 2
    for s in dynamic:
        assert _is_symbolic(s.dims["M"]) and not _is_symbolic(s.dims["K"])
        assert s.hints["M"] == 3  # decided at the example that triggered the recompile
        assert s.status == "rewritten", s.reason  # the rewrite is valid for every M, not just the example's
    assert sites("graph") == []


def test_second_sequence_length_does_not_crash_and_output_matches():
    model = make_model("llama", BIG, torch.bfloat16)
    cm = compiled(model)
    with torch.no_grad():
        for length in (3, 5, 7):
            ids = torch.randint(0, 128, (1, length))
            ref, out = model(ids).logits, cm(ids).logits
            assert out.shape == ref.shape
            assert sqnr_ref(ref, out) >= 20.0, length
    assert len(_graph_ids()) >= 2  # the second length compiled a new graph, which has records of its own


def test_second_sequence_length_sites_are_matched_again():
    """Regression: a dynamic graph gets SymInt example inputs (the sequence length); the gate's capture must run
    the graph on their example values, not fail on them (which fell back the whole graph) or guard them to one
    value (which recompiled at every new length)."""
    model = make_model("llama", BIG, torch.bfloat16)
    with torch.no_grad(), count_calls(model) as counts:
        model(torch.randint(0, 128, (1, 3)))
    cm = compiled(model)
    with torch.no_grad():
        for length in (2, 3, 4):  # short: int8 stays the cheaper candidate at the dynamic graph's hint (3 rows)
            cm(torch.randint(0, 128, (1, length)))
    assert sites("graph") == [], [s.reason for s in sites("graph")]
    graphs = _graph_ids()
    assert len(graphs) == 2  # static for length 2, then one dynamic graph for 3 and 4
    for g in graphs:
        linear = [s for s in matched("linear") if s.graph_id == g]
        attention = [s for s in sites("attention") if s.graph_id == g]  # matched, or missed with a reason
        assert len(linear) == counts["linear"] and len(attention) == counts["attention"]
    second = [s for s in matched("linear") if s.graph_id == graphs[1]]
    assert all(_is_symbolic(s.dims["M"]) for s in second)
    assert any(s.status == "rewritten" for s in second)


def test_dynamic_true_from_the_start_matches_symbolic_sites():
    # fp32 tiny: no candidate is worth trying, so this checks matching alone on a symbolic graph
    model = make_model("llama", SMALL, torch.float32)
    cm = torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(inner="eager")), dynamic=True)
    with torch.no_grad(), count_calls(model) as counts:
        model(torch.randint(0, 128, (1, 4)))
    with torch.no_grad():
        for length in (4, 6, 9):
            ids = torch.randint(0, 128, (1, length))
            torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(_graph_ids()) == 1  # one symbolic graph for every length
    assert sites("graph") == []
    assert len(matched("linear")) == counts["linear"]
    assert all(_is_symbolic(s.dims["M"]) for s in matched("linear"))
    # HF computes is_causal from the (symbolic) query length, so it is a run-time value here: each SDPA call
    # is either matched with symbolic lengths or reported missed with that reason
    attention = sites("attention")
    assert len(attention) == counts["attention"]
    for s in attention:
        if s.status == "missed":
            assert "run-time value" in s.reason
        else:
            assert _is_symbolic(s.dims["Lq"])


def test_eager_attention_is_matched_again_at_a_second_length():
    """HF eager attention (additive causal mask, repeat_kv): the dynamic graph's sites have symbolic lengths."""
    model = make_model("llama", SMALL, torch.float32, attn="eager")
    with torch.no_grad(), count_calls(model) as counts:
        model(torch.randint(0, 128, (1, 3)))
    cm = compiled(model)
    with torch.no_grad():
        for length in (3, 5, 7):
            ids = torch.randint(0, 128, (1, length))
            torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert sites("graph") == [] and sites("attention", "missed") == []
    graphs = _graph_ids()
    assert len(graphs) == 2  # static for length 3, then one dynamic graph for 5 and 7
    for g in graphs:
        attention = [s for s in matched("attention") if s.graph_id == g]
        assert len(attention) == counts["softmax"] and all(s.op == "eager" for s in attention)
    for s in (s for s in matched("attention") if s.graph_id == graphs[1]):
        assert _is_symbolic(s.dims["Lq"]) and _is_symbolic(s.dims["Lk"])


def test_eager_attention_under_dynamic_true_takes_its_run_time_scale_on_q():
    """dynamic=True from the start makes the eager attention's float `scaling` a SymFloat: the scores' factor moves
    onto q (passes/heads.py), so every call is a site with scale 1 and symbolic lengths."""
    model = make_model("llama", SMALL, torch.float32, attn="eager")
    cm = torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(inner="eager")), dynamic=True)
    with torch.no_grad(), count_calls(model) as counts:
        model(torch.randint(0, 128, (1, 4)))
    with torch.no_grad():
        for length in (4, 7):
            ids = torch.randint(0, 128, (1, length))
            torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    attention = matched("attention")
    assert sites("attention", "missed") == [] and len(attention) == counts["softmax"]
    assert all(_is_symbolic(s.dims["Lq"]) for s in attention)


class _EinsumMaskedFill(torch.nn.Module):
    """Causal self-attention spelled with einsum and masked_fill(finfo.min), the mask built from the length."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
        p = scores.masked_fill(causal, torch.finfo(q.dtype).min).softmax(dim=-1)
        return torch.einsum("bhij,bhjd->bhid", p, v)


def test_plain_eager_attention_at_several_lengths_is_rewritten_in_the_dynamic_graph():
    model, cm = _EinsumMaskedFill(), compiled(_EinsumMaskedFill())
    with torch.no_grad():
        for length in (6, 9, 12):
            q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
            torch.testing.assert_close(cm(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-5)
    graphs = _graph_ids()
    assert len(graphs) == 2 and sites("attention", "missed") == []
    [first, second] = [[s for s in sites("attention") if s.graph_id == g] for g in graphs]
    assert len(first) == len(second) == 1
    assert _is_symbolic(second[0].dims["Lq"])
    assert [s.status for s in first + second] == ["rewritten", "rewritten"], [s.reason for s in first + second]
