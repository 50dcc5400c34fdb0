"""The graph check: per-site budgets compound over a graph's sites, so the rewritten graph's outputs are held to
the accuracy budget against the original's, and the sites of lowest SQNR go back to the original until they are."""
import math

import pytest
import torch
from helpers import BIG, compiled, make_model, sites, sqnr_ref

import torchfx_eff
from torchfx_eff import gate


class Chain(torch.nn.Module):
    """Linears in a row: each one's int8 error reaches the output through those after it."""

    def __init__(self, layers=12, width=256):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def chain():
    torch.manual_seed(0)
    return Chain().to(torch.bfloat16).eval(), torch.randn(1, 256, dtype=torch.bfloat16)


def _unchecked(model, x) -> tuple[dict[str, float], torch.Tensor]:
    """Each linear's gated SQNR with the graph check off, and the output with every one rewritten."""
    with torch.no_grad():
        out = compiled(model, check_outputs=False)(x)
    rewritten = sites("linear", "rewritten")
    assert len(rewritten) == len(model.layers) and not sites("outputs")
    torchfx_eff.reset()
    torch._dynamo.reset()
    return {s.site_id: s.sqnr_db for s in rewritten}, out


def test_compounded_error_reverts_the_lowest_sqnr_sites_until_the_output_is_within_budget(chain, monkeypatch):
    model, x = chain
    per_site, everything = _unchecked(model, x)
    with torch.no_grad():
        ref = model(x)
    # a budget every site meets alone, that the chain's output does not meet with all of them rewritten
    budget = (min(per_site.values()) + sqnr_ref(ref, everything)) / 2
    assert sqnr_ref(ref, everything) < budget - 2
    monkeypatch.setitem(gate.GRAPH_BUDGET_DB, "balanced", budget)
    with torch.no_grad():
        out = compiled(model)(x)
    (outputs,) = sites("outputs", "checked")
    reverted = [s for s in sites("linear", "fallback") if s.reason.startswith("reverted by the graph check")]
    kept = sites("linear", "rewritten")
    assert reverted and kept and len(reverted) + len(kept) == len(model.layers)
    assert max(per_site[s.site_id] for s in reverted) <= min(per_site[s.site_id] for s in kept)
    assert all(s.sqnr_db == pytest.approx(per_site[s.site_id]) for s in reverted)  # the report shows what went back
    db = sqnr_ref(ref, out)  # independent of the record: the compiled model against the eager one
    assert db >= budget
    assert outputs.sqnr_db == pytest.approx(db, abs=1e-6)
    assert f"after {len(reverted)} of its {len(model.layers)} rewritten sites" in outputs.reason


def test_within_budget_everything_stays_and_the_record_gives_the_outputs_sqnr(chain):
    model, x = chain
    with torch.no_grad():
        ref = model(x)
        out = compiled(model)(x)
    assert len(sites("linear", "rewritten")) == len(model.layers)
    (outputs,) = sites("outputs", "checked")
    assert outputs.sqnr_db == pytest.approx(sqnr_ref(ref, out), abs=1e-6)
    assert gate.GRAPH_BUDGET_DB["balanced"] <= outputs.sqnr_db < math.inf
    assert "within the 'balanced' budget of 12.0 dB" in outputs.reason


def test_strict_raises_when_the_outputs_miss_the_budget(chain, monkeypatch):
    model, x = chain
    monkeypatch.setattr(gate, "graph_budget_db", lambda *a: 200.0)
    with pytest.raises(Exception, match="failed the graph check"), torch.no_grad():
        compiled(model, strict=True)(x)


def test_outputs_that_no_revert_brings_back_leave_the_graph_unoptimized(chain, monkeypatch):
    model, x = chain
    monkeypatch.setattr(gate, "compare_outputs", lambda ref, out: (-math.inf, "output 0: forced mismatch"))
    with torch.no_grad():
        ref = model(x)
        out = compiled(model)(x)
    (graph,) = sites("graph", "fallback")
    assert "graph check" in graph.reason and f"with all {len(model.layers)} rewritten sites reverted" in graph.reason
    assert not sites("linear", "rewritten")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_reverted_fused_group_keeps_its_members_original():
    """Reverting a sibling-fused linear reverts the linears it fused: unfused again (its copy would be read as
    is), they are not rewritten one by one."""
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(3, 128, (1, 1))  # one row: every linear takes int8
    with torch.no_grad():
        ref = model(ids).logits
        compiled(model, fuse_siblings="auto")(ids)
    members = {name for s in sites("siblings", "rewritten") for name in s.packed}
    assert members
    torchfx_eff.reset()
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(gate, "graph_budget_db", lambda *a: math.inf)  # only the original graph's own output meets it
        out = compiled(model, fuse_siblings="auto")(ids).logits
    assert not sites("linear", "rewritten") and not sites("graph")
    assert all(s.status == "kept" for s in sites("siblings"))
    reverted = {s.site_id for s in sites("linear", "fallback") if s.reason.startswith("reverted by the graph check")}
    assert {m for m in members if m.endswith("weight")} <= reverted
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


class Noisy(torch.nn.Module):
    """A linear whose output gets random noise: two runs agree only from one random state."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(256, 256, bias=False)

    def forward(self, x):
        y = self.linear(x)
        return y + torch.randn_like(y) * y.abs().mean()


def test_a_graph_that_draws_random_numbers_is_compared_from_one_random_state():
    """Each run from its own random state, their noise alone would put the output near 0 dB and send the site back."""
    torch.manual_seed(0)
    model, x = Noisy().to(torch.bfloat16).eval(), torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(model)(x)
    (outputs,) = sites("outputs", "checked")
    assert sites("linear", "rewritten") and outputs.sqnr_db > 20, outputs.reason


class Head(torch.nn.Module):
    """Logits and their argmax: a float output and an integer one."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(256, 512, bias=False)

    def forward(self, x):
        logits = self.linear(x)
        return logits, logits.argmax(-1)


def test_integer_outputs_are_named_in_the_record_and_not_compared():
    """An argmax of rewritten logits may flip between near ties while the logits stay within budget: the check
    compares the floating-point outputs alone, and its record says what it left out."""
    torch.manual_seed(0)
    model, x = Head().to(torch.bfloat16).eval(), torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_logits, _ = model(x)
        logits, ids = compiled(model)(x)
    (outputs,) = sites("outputs", "checked")
    assert sites("linear", "rewritten") and outputs.sqnr_db == pytest.approx(sqnr_ref(ref_logits, logits), abs=1e-6)
    assert "1 floating-point output(s) (1 others, not floating point, not compared)" in outputs.reason
    assert bool((ids == logits.argmax(-1)).all())
