"""Config.release_weights: originals packed by every graph that reads them are released (storage resized to 0 bytes,
metadata unchanged), brought back whenever something needs them, and reported. Tiny random-init models on CPU,
where a released weight's bytes go to a temporary file."""
import copy
import dataclasses

import pytest
import torch
import transformers as T
from helpers import (
    BIG,
    LinearStack,
    compiled,
    linear_modules,
    make_model,
    sites,
    sqnr_ref,
)

import torchfx_eff
from torchfx_eff import memory
from torchfx_eff.kernels import registry
from torchfx_eff.report import Report, SiteRecord


def _twins(family="llama"):
    """Two identical bf16 models: one compiled with release_weights, one without (the reference)."""
    model = make_model(family, BIG, torch.bfloat16)
    return model, copy.deepcopy(model)


def _int8_estimated_fastest(mp):
    """Every linear packed as a release run packs it: on these tiny launch-bound sizes int8 and bf16 are estimated
    within a few percent, so either may win without release_weights (which prefers the packed candidate)."""
    impl = registry._REGISTRY["linear"]["int8_weight_only"]
    mp.setitem(registry._REGISTRY["linear"], "int8_weight_only",
               dataclasses.replace(impl, cost=lambda site, spec: impl.cost(site, spec) / 100))


def _reference(twin, calls, **config):
    """Outputs of `twin` compiled without release_weights, every linear packed as the release run packs it, and its
    fused copies kept; Dynamo and the report are reset afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        _int8_estimated_fastest(mp)
        mp.setattr(memory, "FUSED_COPY_PREFIX", "\0")  # no name starts so: settle takes no copy for a fused one
        cm = compiled(twin, **config)
        with torch.no_grad():
            outs = [call(cm) for call in calls]
    torch._dynamo.reset()
    torchfx_eff.reset()
    return outs


def _released(model):
    return {name for name, p in model.named_parameters() if p.numel() and not p.untyped_storage().nbytes()}


def _weights(status=None):
    return {s.op: s for s in sites("weight", status)}


def test_released_weights_hold_no_storage_and_outputs_are_identical():
    model, twin = _twins()
    ids = torch.randint(0, 128, (1, 4))
    [ref] = _reference(twin, [lambda cm: cm(ids).logits])
    meta = {n: (p.shape, p.stride(), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    cm = compiled(model, release_weights=True)
    with torch.no_grad():
        out = cm(ids).logits
        again = cm(ids).logits  # no recompile: Dynamo's guards see the same metadata
    assert torch.equal(out, ref) and torch.equal(again, ref)
    linear_weights = {n for n, p in model.named_parameters() if any(p is m.weight for m in linear_modules(model))}
    assert _released(model) == linear_weights
    for name, p in model.named_parameters():  # the same objects, the same metadata
        assert p is params[name] and meta[name] == (p.shape, p.stride(), p.dtype, p.device, p.requires_grad)
    assert len({s.graph_id for s in sites()}) == 1
    rewritten = sites("linear", "rewritten")
    assert len(rewritten) == len(linear_weights) and len(_weights("released")) == len(linear_weights)
    assert all("temporary file" in r.reason for r in _weights().values())
    for s in rewritten:  # resident after: the packed copy alone
        assert s.resident_bytes == s.weight_bytes and s.weight_bytes[1] < s.weight_bytes[0]
    report = torchfx_eff.last_report()
    before, after = report.resident_bytes()
    assert before == sum(params[n].nbytes for n in linear_weights)
    assert (before, after) == report.weight_bytes() and after < before / 1.9  # int8 + bf16 scales against bf16
    assert "weights resident" in str(report)


def test_without_release_the_report_counts_originals_beside_their_packed_copies():
    model = make_model("llama", BIG, torch.bfloat16)
    with torch.no_grad():
        compiled(model)(torch.randint(0, 128, (1, 4)))
    assert not _released(model)
    kept = _weights("kept")
    assert kept and all("release_weights is off" in r.reason for r in kept.values())
    before, packed = torchfx_eff.last_report().weight_bytes()
    assert torchfx_eff.last_report().resident_bytes() == (before, before + packed)
    assert all(s.resident_bytes == (s.weight_bytes[0], sum(s.weight_bytes)) for s in sites("linear", "rewritten"))


def test_tied_lm_head_is_kept_because_the_embedding_reads_it():
    model, twin = _twins("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 128, (1, 4))
    [ref] = _reference(twin, [lambda cm: cm(ids).logits])
    with torch.no_grad():
        out = compiled(model, release_weights=True)(ids).logits
    assert torch.equal(out, ref)
    head = [s for s in sites("linear", "rewritten") if "wte" in s.packed[0]]
    assert len(head) == 1  # the LM head is rewritten ...
    [tied] = [r for name, r in _weights().items() if "wte" in name]
    assert tied.status == "kept" and "embedding" in tied.reason, tied  # ... but its weight stays for the embedding
    assert model.transformer.wte.weight.untyped_storage().nbytes() == model.transformer.wte.weight.nbytes
    assert "transformer.wte.weight" not in _released(model) and len(_released(model)) == len(_weights("released")) > 0
    assert head[0].resident_bytes == (head[0].weight_bytes[0], sum(head[0].weight_bytes))


def _generate(cm, prompt, steps, cache):
    """Greedy prefill + decode through `cm`, with `cache` (a DynamicCache or StaticCache); every step's logits."""
    out = cm(input_ids=prompt, past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for i in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        position = torch.tensor([[prompt.shape[1] + i]])
        out = cm(input_ids=token, past_key_values=out.past_key_values, use_cache=True, position_ids=position,
                 cache_position=position[0])
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefill_then_decode_graphs_restore_and_release_again(cache, monkeypatch):
    model, twin = _twins()
    prompt = torch.randint(0, 128, (1, 4))
    new_cache = lambda m: T.DynamicCache(config=m.config) if cache == "dynamic" else \
        T.StaticCache(config=m.config, max_cache_len=16)
    [ref] = _reference(twin, [lambda cm: _generate(cm, prompt, 3, new_cache(twin))])
    restored = []  # (why, weights released before, after) at each compile's start

    def spy(tensors, why):
        tensors = list(tensors)
        count = lambda: sum(isinstance(t, torch.nn.Parameter) and t.numel() and not t.untyped_storage().nbytes()
                            for t in tensors)
        before = count()
        real_restore(tensors, why)
        restored.append((why, before, count()))

    real_restore = memory.restore
    monkeypatch.setattr(memory, "restore", spy)
    with torch.no_grad():
        logits = _generate(compiled(model, release_weights=True), prompt, 3, new_cache(model))
    assert all(torch.equal(a, b) for a, b in zip(logits, ref))
    graphs = sorted({s.graph_id for s in sites("weight")})
    assert len(graphs) >= 2  # prefill, then decode
    assert restored[0][1:] == (0, 0)  # nothing released before the first graph
    assert restored[1] == (f"graph {graphs[1]}'s compile", len(linear_modules(model)), 0)  # every one came back
    assert all(r.status == "released" for r in sites("weight") if r.graph_id == graphs[-1])
    assert _released(model) == {n for n, p in model.named_parameters() if any(p is m.weight for m in linear_modules(model))}


def test_a_recompile_that_keeps_the_original_elsewhere_is_now_packed_for_memory():
    """Without release_weights a later graph at 6 rows keeps bf16 (int8 is not 5% faster there): then the original
    would stay resident. With it, a packed candidate up to cost.MEMORY_SLOWDOWN times slower is taken, and said so."""
    model = make_model("llama", BIG, torch.bfloat16)
    cm = compiled(model, release_weights=True)
    with torch.no_grad():
        for length in (4, 6):
            ids = torch.randint(0, 128, (1, length))
            out = cm(ids).logits
    second = [s for s in sites("linear") if s.graph_id == max(s.graph_id for s in sites())]
    assert all(s.status == "rewritten" for s in second)
    assert any("Config.release_weights: packed so that the original can be released" in s.reason for s in second)
    assert _released(model) and not sites("weight", "kept")
    torchfx_eff.restore_weights(model)
    with torch.no_grad():
        assert sqnr_ref(model(ids).logits, out) >= 20.0


def test_a_site_that_falls_back_keeps_its_weight(monkeypatch):
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 4))
    victim = model.model.layers[1].mlp.down_proj.weight
    real = registry._REGISTRY["linear"]["int8_weight_only"]

    def bad_on_victim(site):
        rep = real.replace(site)
        if site.weight is victim:  # wrong output: the gate refuses it
            return dataclasses.replace(rep, args=(rep.args[0], rep.args[1], -rep.args[2], *rep.args[3:]))
        return rep

    monkeypatch.setitem(registry._REGISTRY["linear"], "int8_weight_only", dataclasses.replace(real, replace=bad_on_victim))
    with torch.no_grad():
        compiled(model, release_weights=True)(ids)
    [fallback] = sites("linear", "fallback")
    assert fallback.hints["K"] == BIG["inter"]
    assert not _weights("kept") and len(_weights("released")) == 14  # the victim is in no graph's constants ...
    assert victim.untyped_storage().nbytes() == victim.nbytes  # ... and its site reads it as is
    assert "model.layers.1.mlp.down_proj.weight" not in _released(model) and len(_released(model)) == 14


class _ReadAndPack(torch.nn.Module):
    """One weight read as is (a row added to x) in one graph and through a linear (packed) in the other."""

    def __init__(self, read_first: bool):
        super().__init__()
        self.lin, self.read_first = torch.nn.Linear(256, 256, dtype=torch.bfloat16), read_first

    def forward(self, x):
        if self.read_first:
            x = x + self.lin.weight[0]
        torch._dynamo.graph_break()
        y = self.lin(x)
        torch._dynamo.graph_break()
        return y if self.read_first else y + self.lin.weight[0]


@pytest.mark.parametrize("read_first", [True, False])
def test_a_weight_another_graph_reads_as_is_is_kept_or_comes_back(read_first):
    """Read first: the packing graph must not release it. Packed first: it is released, then the reading graph's
    compile brings it back and keeps it."""
    model = _ReadAndPack(read_first)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    [ref] = _reference(twin, [lambda cm: cm(x)])
    with torch.no_grad():
        out = compiled(model, release_weights=True)(x)
    assert torch.equal(out, ref)
    [packing] = sites("linear", "rewritten")
    weight = [r for r in sites("weight") if r.op == packing.packed[0]]
    assert [r.status for r in weight] == (["kept"] if read_first else ["released", "kept"])
    reader = int(weight[-1].reason.removeprefix("read as is by graph ").split(":")[0])
    assert (reader < packing.graph_id) == read_first and ": getitem at test_memory.py:" in weight[-1].reason
    assert model.lin.weight.untyped_storage().nbytes() == model.lin.weight.nbytes


def test_restore_weights_gives_the_eager_model_back():
    model, twin = _twins()
    ids = torch.randint(0, 128, (1, 4))
    cm = compiled(model, release_weights=True)
    with torch.no_grad():
        out = cm(ids).logits
        released = _released(model)
        assert released
        with pytest.raises(RuntimeError):  # a linear on a released weight refuses; it never reads garbage
            model(ids)
        assert set(torchfx_eff.restore_weights(model)) == released and not _released(model)
        assert torch.equal(model(ids).logits, twin(ids).logits)  # the originals, bit for bit
        assert torch.equal(cm(ids).logits, out)  # the compiled graph still runs its packed copies
    assert all(r.reason == "restored by restore_weights()" for r in sites("weight", "kept"))
    before, packed = torchfx_eff.last_report().weight_bytes()
    assert torchfx_eff.last_report().resident_bytes() == (before, before + packed)


def test_a_weight_changed_after_restore_runs_the_original_graph_and_brings_back_the_rest():
    """restore_weights(submodule), then an in-place update: the graph's packed copy is stale, so it runs its original
    graph, which reads every weight: those still released come back first."""
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 4))
    cm = compiled(model, release_weights=True)
    with torch.no_grad():
        cm(ids)
        assert torchfx_eff.restore_weights(model.lm_head) == ["weight"]
        model.lm_head.weight.mul_(-1)
        out = cm(ids).logits
        assert not _released(model)
        assert torch.equal(out, model(ids).logits)
    [stale] = sites("graph", "fallback")
    back = [r for r in sites("weight") if r.graph_id == stale.graph_id and r.status == "kept"]
    assert len(back) == len(linear_modules(model)) - 1  # all but the LM head, restored by hand
    assert all(r.reason.startswith(f"read as is by graph {stale.graph_id}: linear at") for r in back)


@pytest.mark.parametrize("release", [True, False])
def test_fused_sibling_copies_are_released_and_recomputed_for_a_later_graph(release):
    """A fused copy is ours: once no graph reads it as is it goes whatever Config.release_weights says (which governs
    the user's parameters), and a later graph recomputes it from its members."""
    model, twin = _twins()
    calls = [lambda cm, n=n: cm(torch.arange(n)[None] + 3).logits for n in (4, 3)]  # int8 wins at both, unreleased too
    ref = _reference(twin, calls, fuse_siblings=True)
    with pytest.MonkeyPatch.context() as mp:
        _int8_estimated_fastest(mp)
        cm = compiled(model, release_weights=release, fuse_siblings=True)
        with torch.no_grad():
            outs = [call(cm) for call in calls]
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    copies = [r for r in sites("weight") if r.op.startswith("_torchfx_eff_cat_")]
    assert copies and all(r.status == "released" and "recomputed from its members" in r.reason for r in copies)
    assert len({r.graph_id for r in copies}) == 2
    assert len(_released(model)) == (len(linear_modules(model)) if release else 0)


def test_a_weight_sharing_its_storage_is_kept():
    model = LinearStack().to(torch.bfloat16)
    flat = torch.randn(512 * 256 + 7, dtype=torch.bfloat16)
    model.up.weight = torch.nn.Parameter(flat[7:].view(512, 256))  # a view into a larger buffer
    with torch.no_grad():
        compiled(model, release_weights=True)(torch.randn(1, 256, dtype=torch.bfloat16))
    reasons = {name.split("_modules_")[-1]: r for name, r in _weights().items()}
    assert reasons["up_parameters_weight_"].status == "kept"
    assert "shares its storage" in reasons["up_parameters_weight_"].reason
    assert reasons["down_parameters_weight_"].status == "released"


def test_inductor_inner_compile_with_released_weights():
    model = make_model("llama", BIG, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 4))
    cm = compiled(model, inner="inductor", release_weights=True)
    with torch.no_grad():
        out, again = cm(ids).logits, cm(ids).logits
    assert torch.equal(out, again) and sites("graph") == [] and _released(model)
    torchfx_eff.restore_weights(model)
    with torch.no_grad():
        assert sqnr_ref(model(ids).logits, out) >= 20.0


def test_resident_bytes_count_each_weight_and_packing_once_by_its_latest_record():
    site = lambda graph, packed, nbytes: SiteRecord(graph, "linear", "rewritten", "linear", chosen="int8_weight_only",
                                                    weight_bytes=nbytes, packed=[packed])
    weight = lambda graph, status, name, nbytes: SiteRecord(graph, "weight", status, name,
                                                            weight_bytes=(nbytes, 0 if status == "released" else nbytes))
    copy_name = "_torchfx_eff_cat_0123_weight"
    report = Report([
        site(0, "w", (100, 52)), weight(0, "released", "w", 100),
        site(1, "w", (100, 52)), weight(1, "kept", "w", 100),  # the same packing; a later graph reads w as is
        site(1, copy_name, (300, 152)), weight(1, "released", copy_name, 300),  # a fused copy: not an original
        weight(1, "released", "a", 150), weight(1, "released", "b", 150),  # its members
    ])
    assert report.resident_bytes() == (100 + 150 + 150, 52 + 152 + 100)
    site_record = dataclasses.replace(report.sites[0], resident_bytes=(100, 52))
    assert SiteRecord.from_dict(site_record.to_dict()) == site_record


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_release_weights_takes_a_bool(value):
    with pytest.raises(ValueError, match=r"Config.release_weights=.* is not allowed; use True or False"):
        torchfx_eff.Config(release_weights=value)


def test_release_weights_from_the_environment():
    assert torchfx_eff.Config.from_env({"TORCHFX_EFF_RELEASE_WEIGHTS": "1"}).release_weights is True
    with pytest.raises(ValueError, match="TORCHFX_EFF_RELEASE_WEIGHTS"):
        torchfx_eff.Config.from_env({"TORCHFX_EFF_RELEASE_WEIGHTS": "maybe"})
