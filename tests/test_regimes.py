"""Shape regimes: with symbolic rows, a linear site is costed at a decode and a prefill size; when the two
choose differently, one compiled graph dispatches on the row count at run time."""
import importlib

import torch
import torch.nn.functional as F
from helpers import LinearStack, compiled, sites

from torchfx_eff import cost
from torchfx_eff.kernels.int8_weight_only import (
    int8_weight_only_linear,
    quantize_per_channel,
)


def _dynamic_sites(cm, model):
    with torch.no_grad():
        for rows in (1, 2):  # the second length makes Dynamo recompile with symbolic rows
            cm(torch.randn(rows, 256, dtype=torch.bfloat16))
    graphs = sorted({s.graph_id for s in sites("linear")})
    return [s for s in sites("linear") if s.graph_id == graphs[-1]]


def test_decode_and_prefill_choose_differently_and_one_graph_dispatches_on_rows():
    torch.manual_seed(0)
    model = LinearStack().to(torch.bfloat16)
    cm = compiled(model)  # eager inner: each branch's output is exactly that implementation's
    dynamic = _dynamic_sites(cm, model)
    assert len(dynamic) == 2
    for s in dynamic:
        labels = list(s.regimes)
        assert labels == ["M<=16 (at M=2)", "M>16 (at M=512)"], labels
        decode, prefill = (s.regimes[k] for k in labels)
        # the estimates behind each regime's choice (pinned CPU spec: int8 wins small M, bf16 GEMM large M)
        assert decode["estimates_us"]["int8_weight_only"] < decode["estimates_us"]["original"]
        assert prefill["estimates_us"]["int8_weight_only"] > prefill["estimates_us"]["original"]
        assert (decode["chosen"], prefill["chosen"]) == ("int8_weight_only", "original")
        assert s.status == "rewritten" and s.chosen == "int8_weight_only" and "dispatch on rows" in s.reason
        before, packed = s.weight_bytes
        assert packed < before and s.resident_bytes == (before, before + packed)  # bf16 stays for the prefill branch
    q, scales = quantize_per_channel(model.up.weight)
    with torch.no_grad():
        for rows in (3, 16, 17, 64):
            x = torch.randn(rows, 256, dtype=torch.bfloat16)
            hidden = int8_weight_only_linear(x, q, scales, model.up.bias) if rows <= cost.SPLIT_ROWS \
                else F.linear(x, model.up.weight, model.up.bias)
            qd, sd = quantize_per_channel(model.down.weight)
            hidden = F.gelu(hidden)
            want = int8_weight_only_linear(hidden, qd, sd, model.down.bias) if rows <= cost.SPLIT_ROWS \
                else F.linear(hidden, model.down.weight, model.down.bias)
            torch.testing.assert_close(cm(x), want, rtol=0, atol=0)


def test_under_inductor_the_dispatch_compiles_and_each_side_matches_the_eager_dispatch():
    """The dispatch is the cond operator itself, over distinct operands: Inductor compiles it (torch.cond's own
    Dynamo trace lifted int arguments that Inductor 2.13's FakeTensorUpdater rejected, and the graph fell back to
    one choice). On both sides of the split the output is the eager-compiled dispatch's to bf16 rounding."""
    torch.manual_seed(0)
    model = LinearStack().to(torch.bfloat16)
    cm, eager = compiled(model, inner="inductor"), None
    dynamic = _dynamic_sites(cm, model)
    assert sites("graph") == [] and all(s.status == "rewritten" for s in dynamic)
    assert all([r["chosen"] for r in s.regimes.values()] == ["int8_weight_only", "original"] for s in dynamic)
    assert not any("could not compile the dispatch" in s.reason for s in dynamic)
    eager = compiled(model)
    _dynamic_sites(eager, model)
    with torch.no_grad():
        for rows in (5, 40):
            x = torch.randn(rows, 256, dtype=torch.bfloat16)
            torch.testing.assert_close(cm(x), eager(x), rtol=2 ** -7, atol=1e-2)


def test_static_rows_have_no_regimes():
    model = LinearStack().to(torch.bfloat16)
    with torch.no_grad():
        compiled(model)(torch.randn(1, 256, dtype=torch.bfloat16))
    assert all(s.regimes == {} for s in sites("linear"))


def test_a_graph_inductor_cannot_compile_with_dispatch_is_rewritten_again_without_it(monkeypatch):
    """Should Inductor fail on a graph with a dispatch, the graph is rewritten again with one choice per site (the
    example's), never left whole on the original, and the reason says so."""
    backend = importlib.import_module("torchfx_eff.backend")  # the module (torchfx_eff.backend is the function)
    real, failed = backend._compile_fx, []

    def fails_on_dispatch(gm, *args, **kwargs):
        if not failed and any(getattr(n.target, "__name__", "") == "by_rows" for n in gm.graph.nodes):
            failed.append(gm)
            raise RuntimeError("a lowering failure")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "_compile_fx", fails_on_dispatch)
    torch.manual_seed(0)
    model = LinearStack().to(torch.bfloat16)
    cm = compiled(model, inner="inductor")
    dynamic = _dynamic_sites(cm, model)
    assert failed and sites("graph") == [] and all(s.status == "rewritten" for s in dynamic)
    assert all(s.regimes == {} and "Inductor could not compile the dispatch on rows (RuntimeError: a lowering "
               "failure)" in s.reason for s in dynamic)
    with torch.no_grad():
        x = torch.randn(40, 256, dtype=torch.bfloat16)
        ref, out = model(x).float(), cm(x).float()
        assert ((ref - out).norm() / ref.norm()) < 0.02
