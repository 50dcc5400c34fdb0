"""Injected failures: a stage that raises, a kernel that computes the wrong thing, a replace that raises."""
import dataclasses

import pytest
import torch
from helpers import BIG, LinearStack, compiled, make_model, matched, sites, sqnr_ref

import torchfx_eff
from torchfx_eff import passes
from torchfx_eff.cost import MARGIN
from torchfx_eff.kernels import Replacement, registry
from torchfx_eff.kernels.int8_weight_only import int8_weight_only_linear


class Boom(RuntimeError):
    pass


def _raise(*_args, **_kwargs):
    raise Boom("injected failure")


@pytest.fixture
def llama_bf16():
    return make_model("llama", BIG, torch.bfloat16), torch.tensor([[5]])


@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_matcher_failure_falls_back_to_the_unchanged_graph(monkeypatch, llama_bf16, kind):
    model, ids = llama_bf16
    monkeypatch.setitem(passes.MATCHERS, kind, _raise)
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model)(ids).logits
    assert torch.equal(out, ref)  # the original graph runs, op for op
    report = torchfx_eff.last_report()
    assert len(report.sites) == 1, report
    [rec] = report.sites
    assert (rec.kind, rec.status) == ("graph", "fallback")
    assert "'match'" in rec.reason and "Boom" in rec.reason and "injected failure" in rec.reason
    assert report.summary() == {"graph": {"fallback": 1}}


def test_matcher_failure_with_strict_raises(monkeypatch, llama_bf16):
    model, ids = llama_bf16
    monkeypatch.setitem(passes.MATCHERS, "linear", _raise)
    with pytest.raises(Exception) as e, torch.no_grad():
        compiled(model, strict=True)(ids)
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(x, Boom) for x in chain), chain
    assert any("stage 'match' failed" in str(x) for x in chain), chain
    assert torchfx_eff.last_report().sites == []  # nothing was recorded as if it had worked


def test_cost_stage_failure_falls_back(monkeypatch, llama_bf16):
    model, ids = llama_bf16
    monkeypatch.setattr(torchfx_eff.cost, "candidates", _raise)
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model)(ids).logits
    assert torch.equal(out, ref)
    [rec] = torchfx_eff.last_report().sites
    assert (rec.kind, rec.status) == ("graph", "fallback") and "'cost'" in rec.reason


def _patch_int8(monkeypatch, **changes):
    impl = registry._REGISTRY["linear"]["int8_weight_only"]
    monkeypatch.setitem(registry._REGISTRY["linear"], "int8_weight_only", dataclasses.replace(impl, **changes))
    return impl


def test_wrong_kernel_output_is_caught_by_the_gate(monkeypatch, llama_bf16):
    model, ids = llama_bf16
    real = registry._REGISTRY["linear"]["int8_weight_only"]

    def bad_replace(site):
        rep = real.replace(site)
        x, q, scales, bias = rep.args
        return Replacement(rep.op, (x, q, -scales, bias), rep.kwargs, rep.weight_bytes)  # negated output

    _patch_int8(monkeypatch, replace=bad_replace)
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model)(ids).logits
    linear = matched("linear")
    chose_int8 = [s for s in linear if s.status != "kept"]
    assert chose_int8, torchfx_eff.last_report()  # the cost model did pick int8 for these sites
    for s in linear:  # exactly the sites where int8 was estimated faster went through the gate
        est = {c.name: c.estimate_us for c in s.candidates}
        assert (s.status != "kept") == (est["int8_weight_only"] < MARGIN * est["original"]), s
    for s in chose_int8:
        assert s.status == "fallback" and s.chosen == "original", s
        assert "int8_weight_only failed the gate" in s.reason and "SQNR" in s.reason, s.reason
        assert s.sqnr_db is None and s.weight_bytes is None
    assert sites("linear", "rewritten") == []
    assert torch.equal(out, ref)  # the unoptimized computation


def test_wrong_kernel_with_strict_raises(monkeypatch):
    real = registry._REGISTRY["linear"]["int8_weight_only"]

    def bad_replace(site):
        rep = real.replace(site)
        x, q, scales, bias = rep.args
        return Replacement(rep.op, (x, q, scales * 4, bias), rep.kwargs, rep.weight_bytes)

    _patch_int8(monkeypatch, replace=bad_replace)
    with pytest.raises(Exception, match="numerics gate"), torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16), strict=True)(torch.randn(1, 256, dtype=torch.bfloat16))


def test_wrong_shape_or_nonfinite_output_is_caught(monkeypatch):
    real = registry._REGISTRY["linear"]["int8_weight_only"]
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)

    def nan_op(x, q, s, b):
        out = int8_weight_only_linear(x, q, s, b)
        return out.index_fill(-1, torch.tensor([0]), float("nan"))

    for op, needle in [(nan_op, "non-finite"),
                       (lambda x, q, s, b: int8_weight_only_linear(x, q, s, b).float(), "differs")]:
        torch._dynamo.reset()
        torchfx_eff.reset()

        def bad_replace(site, op=op):
            rep = real.replace(site)
            return Replacement(op, rep.args, rep.kwargs, rep.weight_bytes)

        _patch_int8(monkeypatch, replace=bad_replace)
        with torch.no_grad():
            out = compiled(model)(x)
            ref = model(x)
        linear = matched("linear")
        assert len(linear) == 2
        assert all(s.status == "fallback" and needle in s.reason for s in linear), [s.reason for s in linear]
        assert torch.equal(out, ref)


def test_replace_failing_for_one_site_falls_back_there_only(monkeypatch, llama_bf16):
    model, ids = llama_bf16
    real = registry._REGISTRY["linear"]["int8_weight_only"]
    victim = model.model.layers[1].mlp.down_proj.weight

    def flaky_replace(site):
        if site.weight is victim:
            raise Boom("cannot pack this one")
        return real.replace(site)

    _patch_int8(monkeypatch, replace=flaky_replace)
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model)(ids).logits
    linear = matched("linear")
    failed = [s for s in linear if s.status == "fallback"]
    assert len(failed) == 1
    [f] = failed
    assert "'replace:int8_weight_only'" in f.reason and "cannot pack this one" in f.reason
    assert f.hints == {"M": 1, "N": BIG["hidden"], "K": BIG["inter"]}  # down_proj's shape
    others = [s for s in linear if s is not f]
    assert others and all(s.status == "rewritten" and s.sqnr_db >= 20 for s in others), [s.status for s in others]
    assert sites("graph") == []  # the graph itself did not fall back
    assert sqnr_ref(ref, out) >= 20.0


def test_gate_failure_inside_check_falls_back_for_that_site(monkeypatch):
    """A kernel that raises when run (inside the gate stage) is a site fallback, not a graph fallback."""
    real = registry._REGISTRY["linear"]["int8_weight_only"]

    def raising_op(*args):
        raise Boom("kernel crashed")

    def replace(site):
        rep = real.replace(site)
        return Replacement(raising_op, rep.args, rep.kwargs, rep.weight_bytes)

    _patch_int8(monkeypatch, replace=replace)
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model)(x)
        ref = model(x)
    linear = matched("linear")
    assert len(linear) == 2
    for s in linear:
        assert s.status == "fallback" and "'gate:int8_weight_only'" in s.reason and "kernel crashed" in s.reason
    assert torch.equal(out, ref)
    # strict: the error propagates
    torch._dynamo.reset()
    with pytest.raises(Exception, match="kernel crashed"), torch.no_grad():
        compiled(model, strict=True)(x)


def test_original_cost_failure_does_not_crash_the_compile(monkeypatch):
    impl = registry._REGISTRY["linear"]["original"]
    monkeypatch.setitem(registry._REGISTRY["linear"], "original", dataclasses.replace(impl, cost=_raise))
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model)(x)
        ref = model(x)
    assert torch.equal(out, ref)
    assert all(s.status in ("kept", "fallback") for s in torchfx_eff.last_report().sites)


class _FlakyInductor:
    """Stands in for Inductor's compile_fx: it raises on a graph that holds our ops (the rewritten graph, with or
    without combo kernels) and runs any other graph as is (no real Inductor compile, so this stays fast)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if _has_torchfx_eff_op(gm):
            raise Boom("inductor broke")
        return gm.forward


def _has_torchfx_eff_op(gm):
    return any(getattr(n.target, "__module__", "").startswith("torchfx_eff") or "torchfx_eff" in str(n.target)
               for n in gm.graph.nodes)


@pytest.fixture
def flaky_inductor(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    fake = _FlakyInductor()
    monkeypatch.setattr(compile_fx_module, "compile_fx", fake)
    return fake


def test_inner_compile_failure_compiles_the_original_graph(flaky_inductor):
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model, inner="inductor")(x)
        ref = model(x)
    # the rewritten graph with combo kernels, then without; then the original
    assert [_has_torchfx_eff_op(gm) for gm in flaky_inductor.graphs] == [True, True, False]
    assert torch.equal(out, ref)  # the original graph runs
    [g] = sites("graph")
    assert g.status == "fallback" and "inner compile failed" in g.reason and "inductor broke" in g.reason
    assert sites("inductor") == []  # without combo kernels it failed too: not their fault


@pytest.mark.parametrize("combo_kernels", [True, False])
def test_combo_kernel_failure_compiles_without_them(monkeypatch, combo_kernels):
    """An Inductor that fails with combo kernels on: the rewritten graph compiles without them and an "inductor"
    record says so. Config.combo_kernels=False turns them off whatever Inductor's global setting."""
    import torch._inductor.compile_fx as compile_fx_module

    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        rewritten_eager = compiled(model)(x)  # the same rewrites, without Inductor
    calls = []

    def fails_with_combo_kernels(gm, example_inputs):
        calls.append((_has_torchfx_eff_op(gm), torch._inductor.config.combo_kernels))
        if torch._inductor.config.combo_kernels:
            raise Boom("combo kernel codegen broke")
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fails_with_combo_kernels)
    with torch.no_grad(), torch._inductor.config.patch(combo_kernels=True):  # as if the user had set it globally
        out = compiled(model, inner="inductor", combo_kernels=combo_kernels)(x)
    assert calls == ([(True, True), (True, False)] if combo_kernels else [(True, False)])
    assert torch.equal(out, rewritten_eager)
    assert sites("linear", "rewritten") and sites("graph") == []
    if combo_kernels:
        [record] = sites("inductor")
        assert record.status == "fallback" and "combo kernel codegen broke" in record.reason
    else:
        assert sites("inductor") == []


def test_inner_compile_failure_with_strict_raises(flaky_inductor):
    with pytest.raises(Exception, match="inductor broke"), torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16), inner="inductor", strict=True)(torch.randn(1, 256, dtype=torch.bfloat16))


def test_inner_compile_failure_leaves_no_site_reported_rewritten(flaky_inductor):
    with torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16), inner="inductor")(torch.randn(1, 256, dtype=torch.bfloat16))
    assert sites("graph", "fallback")
    assert sites(status="rewritten") == []


def test_inner_compile_failure_is_in_the_jsonl_log(flaky_inductor, tmp_path):
    log = tmp_path / "log.jsonl"
    with torch.no_grad():
        compiled(LinearStack().to(torch.bfloat16), inner="inductor", log=log)(torch.randn(1, 256, dtype=torch.bfloat16))
    assert sites("graph", "fallback")
    assert torchfx_eff.report.Report.from_jsonl(log) == torchfx_eff.last_report()


def test_dynamo_restart_from_the_inner_compiler_is_not_a_failure(monkeypatch):
    """Inductor raises RestartAnalysis subclasses to make Dynamo re-trace the frame; they must reach Dynamo
    rather than be taken for a failure (which would log a fallback and run the original graph)."""
    import torch._inductor.compile_fx as compile_fx_module

    calls = []

    def restart_once(gm, example_inputs):
        calls.append(gm)
        if len(calls) == 1:
            raise torch._dynamo.exc.TensorifyScalarRestartAnalysis()
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", restart_once)
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(model, inner="inductor")(x)
        ref = model(x)
    assert len(calls) == 2 and all(_has_torchfx_eff_op(gm) for gm in calls)  # re-traced, rewritten again
    assert sites("graph") == []
    assert sites("linear", "rewritten")
    assert sqnr_ref(ref, out) >= 20.0


def test_a_failing_applicability_predicate_refuses_that_candidate_only(monkeypatch):
    def broken(site, spec):
        raise KeyError("no such property")

    _patch_int8(monkeypatch, applicable=broken)
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref = compiled(model)(x), model(x)
    assert torch.equal(out, ref)
    assert sites("graph") == []
    for s in sites("linear"):
        int8 = next(c for c in s.candidates if c.name == "int8_weight_only")
        assert s.status == "kept" and not int8.applicable and "applicability check failed" in int8.reason
