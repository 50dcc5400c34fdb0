"""Fused linear epilogues: the generated Triton source (codegen/), every epilogue kind fused into the weight-only and
scaled_mm kernels against the unfused PyTorch graph (interpreter: fp32 and fp16), the matcher's patterns and misses,
the gate's fallback, the cost credit, and the backend end to end on a tiny Llama with the Triton path forced."""
import dataclasses
import pathlib

import pytest
import sympy
import torch
import torch.nn.functional as F
from helpers import (
    SMALL,
    WEIGHT_ONLY_PATHS,
    LinearStack,
    compiled,
    compiles_for_sm90,
    first_output,
    force_weight_only_path,
    found_sites,
    make_model,
    sites,
    sqnr_ref,
    unfused_epilogue,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import torchfx_eff
from torchfx_eff import codegen
from torchfx_eff.cost import devices, formulas
from torchfx_eff.kernels import registry, weight_only_triton
from torchfx_eff.kernels.int4_weight_only import pack_int4, quantize_int4
from torchfx_eff.kernels.int8_weight_only import quantize_per_channel
from torchfx_eff.kernels.quant_gemm import quantize_rows, scaled_mm
from torchfx_eff.kernels.weight_only_triton import weight_only_matmul

SPECS = ["relu", "silu", "gelu", "gelu_tanh", "add", "silu,mul", "gelu,add", "glu_silu", "glu_gelu_tanh,add"]


def assert_close_to_unfused(fused, reference, dtype=None):
    """fp32: both sides round alike; fp16 (the reference's dtype, or `dtype`): the unfused graph rounds the linear's
    output (and each op's) to fp16 first."""
    unit = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -9}[dtype or reference.dtype]
    assert fused.dtype == reference.dtype and fused.shape == reference.shape
    torch.testing.assert_close(fused.float(), reference.float(), rtol=2 * unit, atol=unit * float(reference.abs().max()))


def _weights(bits, N, K):
    """The packed weights (weight, scales, zeros) of a random [N, K] linear and the kernel's (bits, group_size)."""
    w = torch.randn(N, K)
    if bits == 8:
        return quantize_per_channel(w) + (None,), (8, 0)
    codes, scales, zeros = quantize_int4(w, 32)
    return (pack_int4(codes, 32), scales, zeros), (4, 32)


def _paired(t):
    return None if t is None else codegen.pair_channels(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kernel,M", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_kernels_fuse_each_epilogue_like_the_unfused_graph(bits, spec, kernel, M, dtype, monkeypatch):
    """N = 130 (65 after pairing) and K = 100 leave edge tiles in every direction. The dequantize path (cuBLAS on
    the decoded weights) applies the epilogue in a pass of its own."""
    force_weight_only_path(monkeypatch, kernel)
    N, K = 130, 100
    (w, s, z), (b, g) = _weights(bits, N, K)
    x, bias = torch.randn(M, K).to(dtype), torch.randn(N).to(dtype)
    n_out = codegen.out_features(spec, N)
    operand = torch.randn(M, n_out).to(dtype) if codegen.reads_operand(spec) else None
    reference = unfused_epilogue(spec, weight_only_matmul(x, w, s, z, bias, b, g), operand)
    if spec.startswith("glu_"):  # the weights and bias as a sibling-fused gate/up is packed: channels interleaved
        w, s, z, bias = map(_paired, (w, s, z, bias))
    assert_close_to_unfused(weight_only_matmul(x, w, s, z, bias, b, g, spec, operand), reference)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("M", [1, 7])
def test_cast_is_the_dtype_the_kernel_stores(x_dtype, out_dtype, M):
    (w, s, _), _ = _weights(8, 40, 64)
    x, r = torch.randn(3, M, 64).to(x_dtype), torch.randn(3, M, 40).to(x_dtype)
    out = weight_only_matmul(x, w, s, None, None, 8, 0, "silu,add", r, out_dtype)
    reference = (F.silu(weight_only_matmul(x, w, s, None, None, 8, 0).float()) + r.float()).to(out_dtype)
    assert out.shape == (3, M, 40)
    assert_close_to_unfused(out, reference, torch.float16)


@pytest.mark.parametrize("spec", ["relu", "gelu,add", "silu,mul", "glu_silu", "glu_gelu,add"])
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_scaled_mm_fuses_epilogues_like_the_unfused_graph(spec, M, out_dtype):
    N, K = 98, 80
    a, sa = quantize_rows(torch.randn(M, K), torch.int8)
    b, sb = quantize_rows(torch.randn(N, K), torch.int8)
    bias = torch.randn(N)
    operand = torch.randn(M, codegen.out_features(spec, N)).to(out_dtype) if codegen.reads_operand(spec) else None
    reference = unfused_epilogue(spec, scaled_mm(a, b, sa, sb, bias, out_dtype), operand)
    if spec.startswith("glu_"):
        b, sb, bias = map(_paired, (b, sb, bias))
    assert_close_to_unfused(scaled_mm(a, b, sa, sb, bias, out_dtype, epilogue=spec, operand=operand), reference)


def test_source_is_written_to_a_file_imported_and_cached_by_its_text(cache_dir):
    text = codegen.source("glu_silu,add")
    assert "def epilogue_glu_silu_add(acc, offs_m, offs_n, M, N, Out, stride_om, E, stride_em):" in text
    assert "gate * tl.sigmoid(gate) * up" in text and "tl.store(" in text
    fn = codegen.epilogue("glu_silu,add")
    assert codegen.epilogue("glu_silu,add") is fn
    [path] = [p for p in (pathlib.Path(cache_dir) / "codegen").iterdir() if p.read_text() == text]
    assert path.suffix == ".py" and str(path) in codegen.dump() and text in codegen.dump()
    assert codegen.source("").count("tl.store") == 1  # no epilogue: the plain store


@pytest.mark.parametrize("spec,error,match", [
    ("swish", ValueError, "unknown step 'swish'"),
    ("add,glu_silu", ValueError, "glu_silu must come first"),
    ("add,silu,mul", ValueError, "more than one operand"),
    (3, TypeError, "not a string"),
])
def test_bad_specs_raise(spec, error, match):
    with pytest.raises(error, match=match):
        codegen.source(spec)


@pytest.mark.parametrize("spec,operand_shape,N,match", [
    ("add", None, 40, "reads an operand"),
    ("silu", (5, 40), 40, "reads no operand"),
    ("add", (5, 39), 40, r"operand \(5, 39\) on cpu does not match the output \(5, 40\)"),
    ("mul", (40,), 40, "does not match the output"),  # no broadcast
    ("glu_silu", None, 41, "odd number"),
])
def test_kernel_inputs_that_do_not_fit_the_epilogue_raise(spec, operand_shape, N, match):
    (w, s, _), _ = _weights(8, N, 64)
    operand = None if operand_shape is None else torch.randn(operand_shape)
    with pytest.raises(ValueError, match=match):
        weight_only_matmul(torch.randn(5, 64), w, s, None, None, 8, 0, spec, operand)


def test_fake_kernels_know_the_output_shape_and_dtype():
    with FakeTensorMode():
        x, q, s = torch.empty(3, 7, 48), torch.empty(24, 48, dtype=torch.int8), torch.empty(24, dtype=torch.bfloat16)
        up = torch.empty(3, 7, 12)
        out = torch.ops.torchfx_eff.weight_only_mm.default(x, q, s, None, None, 8, 0, "glu_silu,add", up, torch.float16)
        assert out.shape == (3, 7, 12) and out.dtype == torch.float16
        a, b = torch.empty(5, 48, dtype=torch.int8), torch.empty(24, 48, dtype=torch.int8)
        out = torch.ops.torchfx_eff.scaled_mm.default(a, b, torch.empty(5), torch.empty(24), None, torch.float32,
                                                      "glu_gelu")
        assert out.shape == (5, 12) and out.dtype == torch.float32


# Graph patterns. Each module reads x [2, 3, 32] and r [2, 3, 48]; a, b: linears 32 -> 48; c: 32 -> 96 (gate/up).
class Net(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(32, 48), torch.nn.Linear(32, 48), torch.nn.Linear(32, 96)
        self.body = body

    def forward(self, x, r):
        return self.body(self, x, r)


def _swiglu_chunks(m, x, r):
    gate, up = m.c(x).chunk(2, dim=-1)
    return F.silu(gate) * up


# name -> (body, spec, labels, dtype)
FUSED = {
    "silu": (lambda m, x, r: F.silu(m.a(x)), "silu", ["silu"], torch.float32),
    "gelu": (lambda m, x, r: F.gelu(m.a(x)), "gelu", ["gelu"], torch.float32),
    "gelu_tanh": (lambda m, x, r: F.gelu(m.a(x), approximate="tanh"), "gelu_tanh", ["gelu_tanh"], torch.float32),
    "relu_method": (lambda m, x, r: m.a(x).relu(), "relu", ["relu"], torch.float32),
    "torch_relu": (lambda m, x, r: torch.relu(m.a(x)), "relu", ["relu"], torch.float32),
    "residual": (lambda m, x, r: r + m.a(x), "add", ["+residual"], torch.float32),
    "torch_add": (lambda m, x, r: torch.add(m.a(x), r), "add", ["+residual"], torch.float32),
    "swiglu": (lambda m, x, r: F.silu(m.a(x)) * m.b(x), "silu,mul", ["swiglu(silu)"], torch.float32),
    "up_first": (lambda m, x, r: m.b(x) * F.gelu(m.a(x), approximate="tanh"), "gelu_tanh,mul", ["swiglu(gelu_tanh)"],
                 torch.float32),
    "chunked_gate_up": (_swiglu_chunks, "glu_silu", ["swiglu(silu) of the fused gate/up"], torch.float32),
    "half": (lambda m, x, r: m.a(x).half(), "", ["to float16"], torch.float16),
    "chain": (lambda m, x, r: (F.gelu(m.a(x)) + r).to(torch.float16), "gelu,add", ["gelu", "+residual", "to float16"],
              torch.float16),
}


def _epilogues(found):
    return {s.node.name: s.epilogue for s in found if s.epilogue is not None}


@pytest.mark.parametrize("name", FUSED)
def test_patterns(name):
    """Matched on any path (here on CPU, where no candidate fuses it)."""
    body, spec, labels, dtype = FUSED[name]
    model, x, r = Net(body).eval(), torch.randn(2, 3, 32), torch.randn(2, 3, 48)
    with torch.no_grad(), found_sites("linear") as found:
        ref, out = model(x, r), compiled(model, accuracy="aggressive")(x, r)
    [ep] = _epilogues(found).values()
    assert (ep.spec, ep.labels, ep.dtype) == (spec, labels, dtype)
    assert out.dtype == ref.dtype and sqnr_ref(ref, out) > 30
    assert not sites("epilogue")
    for s in sites("linear", "rewritten"):
        assert not s.epilogue and (s.hints["N"] == 48 or "stays as graph ops" in s.reason), s.reason


def test_a_candidate_that_cannot_fuse_keeps_the_epilogue_as_graph_ops():
    """int8_weight_only on ATen's CPU kernel (bf16, decode-sized: rewritten there)."""
    model = LinearStack().to(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, out = model(x), compiled(model)(x)
    up = next(s for s in sites("linear") if s.hints["N"] == 512)
    assert (up.status, up.chosen, up.epilogue) == ("rewritten", "int8_weight_only", "")
    assert "its epilogue (gelu) stays as graph ops: int8_weight_only does not fuse it here" in up.reason
    assert sqnr_ref(ref, out) > 30


def _silu_used_twice(m, x, r):
    act = F.silu(m.a(x))
    return act * m.b(x) + act


def _linear_used_twice(m, x, r):
    y = m.a(x)
    return F.silu(y), y


# name -> (body, the op left out, words of the reason, the epilogue that remains)
MISSED = {
    "activation_used_twice": (_silu_used_twice, "mul", "the value of silu has 2 users", "silu"),
    "linear_used_twice": (_linear_used_twice, "silu", "the value of linear has 2 users", None),
    "broadcast_residual": (lambda m, x, r: m.a(x) + r[0, 0], "add", "shape (48,) is not the output's (2, 3, 48)", None),
    "not_swiglu": (lambda m, x, r: F.silu(m.a(x)) * r, "mul", "not a linear of the gate's input", "silu"),
    "in_place": (lambda m, x, r: F.relu(m.a(x), inplace=True), "relu", "works in place", None),
    "integer_cast": (lambda m, x, r: m.a(x).to(torch.int32), "to", "not torch.int32", None),
    "scaled_add": (lambda m, x, r: torch.add(m.a(x), r, alpha=2), "add", "scales its operand (alpha)", None),
}


@pytest.mark.parametrize("name", MISSED)
def test_misses_say_why(name):
    body, op, why, remains = MISSED[name]
    model, x, r = Net(body).eval(), torch.randn(2, 3, 32), torch.randn(2, 3, 48)
    with torch.no_grad(), found_sites("linear") as found:
        compiled(model, accuracy="aggressive")(x, r)
    [miss] = sites("epilogue", "missed")
    assert miss.op == op and why in miss.reason and "not fused into the epilogue of linear" in miss.reason, miss.reason
    assert [e.spec for e in _epilogues(found).values()] == ([remains] if remains else [])


def _residual_stream(m, x, r):
    h = r + m.a(x)
    return h.float(), h + m.b(x)  # the next layer casts the sum for its norm and adds to it again


def test_a_residual_sum_that_several_ops_read_ends_the_epilogue_without_a_miss():
    model = Net(_residual_stream).eval().half()
    with torch.no_grad(), found_sites("linear") as found:
        compiled(model)(torch.randn(2, 3, 32).half(), torch.randn(2, 3, 48).half())
    assert [e.labels for e in _epilogues(found).values()] == [["+residual"], ["+residual"]]
    assert not sites("epilogue")


@pytest.fixture
def triton_path(monkeypatch):
    """The cost model takes interpreted Triton kernels for GPU-fast (as test_int8_kernel does), so that the weight-only
    candidates run their Triton kernels, which fuse epilogues."""
    monkeypatch.setattr(weight_only_triton, "INTERPRETER_SLOWDOWN", 1e-3)


def _calls(monkeypatch):
    """The epilogue spec of each weight_only_matmul call (the gate's runs and the model's)."""
    specs, real = [], weight_only_matmul
    monkeypatch.setattr(weight_only_triton, "weight_only_matmul", lambda *a: specs.append(a[7] if len(a) > 7 else "")
                        or real(*a))
    return specs


def _compile_both(model, *inputs, **config):
    """Outputs of the model compiled with and without fused epilogues, and the first one's report."""
    outs = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        torchfx_eff.reset()
        with torch.no_grad():
            outs[fuse] = compiled(model, fuse_epilogues=fuse, **config)(*inputs)
    return outs[True], outs[False], torchfx_eff.last_report()


@pytest.mark.parametrize("name", ["gelu", "residual", "swiglu", "chunked_gate_up", "chain"])
@pytest.mark.parametrize("name_int", ["int8_weight_only", "int4_weight_only"])
def test_backend_fuses_on_the_triton_path_like_the_unfused_graph(name, name_int, triton_path, monkeypatch):
    body, spec, labels, _ = FUSED[name]
    model, x, r = Net(body).eval(), torch.randn(2, 3, 32), torch.randn(2, 3, 48)
    specs = _calls(monkeypatch)
    fused, reference, report = _compile_both(model, x, r, linear=(name_int,), accuracy="aggressive")
    torch.testing.assert_close(fused.float(), reference.float(), rtol=1e-3, atol=1e-3)  # fp16 out in "chain"
    linear = [s for s in report.sites if s.kind == "linear"]
    [site] = [s for s in linear if s.epilogue]
    assert (site.status, site.chosen, site.epilogue) == ("rewritten", name_int, ", ".join(labels))
    assert f"{name_int}[{site.epilogue}]" in str(report)
    assert spec in specs[-len(linear):]  # the model's run called the fused kernel


def test_weight_only_fuses_below_the_rows_where_cublas_takes_over(triton_path):
    """From DEQUANTIZE_MIN_ROWS[8] rows cuBLAS multiplies the decoded weights: there a site keeps its epilogue as graph
    ops, which Inductor fuses into one pass."""
    model = Net(FUSED["gelu"][0]).eval()
    with torch.no_grad():
        compiled(model)(torch.randn(weight_only_triton.DEQUANTIZE_MIN_ROWS[8], 32), torch.randn(1, 48))
    [site] = sites("linear")
    assert (site.status, site.chosen, site.epilogue) == ("rewritten", "int8_weight_only", "")
    assert "its epilogue (gelu) stays as graph ops: int8_weight_only does not fuse it here" in site.reason


def test_symbolic_rows_fuse_and_rerun_at_other_sizes(triton_path):
    """Fused for rows that may take the Triton kernels; past DEQUANTIZE_MIN_ROWS[8] a pass of its own applies it."""
    model = Net(lambda m, x, r: F.silu(m.a(x)) * m.b(x) + r).eval()
    cm = torch.compile(model, dynamic=True, backend=torchfx_eff.backend(torchfx_eff.Config(
        inner="eager", linear=("int8_weight_only",), fuse_siblings=False)))
    for rows in (3, 5, 70, weight_only_triton.DEQUANTIZE_MIN_ROWS[8] + 1):
        x, r = torch.randn(rows, 32), torch.randn(rows, 48)
        with torch.no_grad():
            torch.testing.assert_close(cm(x, r), model(x, r), rtol=0.05, atol=0.05)  # int8 weights
    [site] = [s for s in sites("linear") if s.epilogue]  # one graph, its rows symbolic
    assert site.epilogue == "swiglu(silu)" and not site.dims["M"].isdigit()


def test_a_row_dispatch_fuses_only_if_both_regimes_choices_do(triton_path, monkeypatch):
    """int8 (Triton, fusing) for decode, the original for prefill: one dispatch computes one value, so unfused."""
    impl = registry._REGISTRY["linear"]["int8_weight_only"]
    decode_only = lambda site, spec: sympy.Piecewise((1e-9, site.dims["M"] <= 16), (1.0, True))
    monkeypatch.setitem(registry._REGISTRY["linear"], "int8_weight_only", dataclasses.replace(impl, cost=decode_only))
    model = Net(FUSED["gelu"][0]).eval()
    cm = compiled(model)
    with torch.no_grad():
        for rows in (1, 2, 40):  # the second size makes Dynamo recompile with symbolic rows
            x, r = torch.randn(rows, 32), torch.randn(rows, 48)
            torch.testing.assert_close(cm(x, r), model(x, r), rtol=0.05, atol=0.05)
    site = sites("linear")[-1]
    assert [r["chosen"] for r in site.regimes.values()] == ["int8_weight_only", "original"] and not site.epilogue
    assert "its epilogue (gelu) stays as graph ops: original does not fuse it here" in site.reason


def test_fused_replacement_that_fails_the_gate_falls_back_to_the_unfused_one(triton_path, monkeypatch):
    real = codegen.epilogue
    monkeypatch.setattr(codegen, "epilogue", lambda spec: real(""))  # a broken codegen: the epilogue is dropped
    model, x, r = Net(FUSED["gelu"][0]).eval(), torch.randn(2, 3, 32), torch.randn(2, 3, 48)
    with torch.no_grad():
        ref, out = model(x, r), compiled(model)(x, r)
    [site] = sites("linear")
    assert (site.status, site.chosen, site.epilogue) == ("rewritten", "int8_weight_only", "")
    assert "int8_weight_only with its epilogue failed the gate: SQNR" in site.reason
    assert "its epilogue (gelu) stays as graph ops: fused, it failed the gate" in site.reason
    assert sqnr_ref(ref, out) > 30


def test_fused_estimate_is_credited_the_output_round_trip_and_a_launch(triton_path):
    model, x, r = Net(FUSED["residual"][0]).eval(), torch.randn(2, 3, 32), torch.randn(2, 3, 48)
    with torch.no_grad(), found_sites("linear") as found:
        compiled(model)(x, r)
    [site], spec = found, devices.detect(torch.device("cpu"))
    fused = formulas.evaluate(formulas.epilogue(site, spec, True), site.hints)
    unfused_pass = formulas.evaluate(formulas.epilogue(site, spec, False), site.hints)
    M, N, b = 6, 48, 4
    bandwidth = spec.bandwidth * spec.eff("elementwise")[1]
    assert unfused_pass - fused == pytest.approx(2 * M * N * b / bandwidth + spec.launch_s)
    assert fused == pytest.approx(M * N * b / bandwidth)  # the residual's read: the result replaces the output
    [record] = sites("linear")
    cands = {c.name: c.estimate_us for c in record.candidates}
    torch._dynamo.reset()
    torchfx_eff.reset()
    with torch.no_grad():
        compiled(model, fuse_epilogues=False)(x, r)
    plain = {c.name: c.estimate_us for c in sites("linear")[0].candidates}
    assert cands["int8_weight_only"] - plain["int8_weight_only"] == pytest.approx(fused * 1e6)
    assert cands["original"] - plain["original"] == pytest.approx(unfused_pass * 1e6)


LLAMA_EPILOGUES = {False: ["+residual", "swiglu(silu)", "+residual"],
                   True: ["+residual", "swiglu(silu) of the fused gate/up", "+residual"]}


@pytest.mark.parametrize("fuse_siblings", [False, True], ids=["separate", "siblings"])
def test_tiny_llama_end_to_end_fused_like_unfused(fuse_siblings, triton_path):
    model = make_model("llama", SMALL, torch.float32)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        eager = first_output(model(ids))
    fused, reference, report = _compile_both(model, ids, fuse_siblings=fuse_siblings)
    fused, reference = first_output(fused), first_output(reference)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)  # the same int8 weights, fp32 rounding
    assert sqnr_ref(eager, fused) > 30
    linear = [s for s in report.sites if s.kind == "linear"]
    assert all((s.status, s.chosen) == ("rewritten", "int8_weight_only") for s in linear), report
    assert [s.epilogue for s in linear if s.epilogue] == LLAMA_EPILOGUES[fuse_siblings] * SMALL["layers"]
    assert not [s for s in report.sites if s.kind == "epilogue"]


def test_fused_ops_compile_under_inductor(triton_path):
    model, x, r = Net(lambda m, x, r: F.silu(m.a(x)) * m.b(x) + r).eval(), torch.randn(2, 3, 32), torch.randn(2, 3, 48)
    with torch.no_grad():
        reference = compiled(model, fuse_epilogues=False)(x, r)
        torch._dynamo.reset()
        out = compiled(model, inner="inductor")(x, r)
    assert [s.epilogue for s in sites("linear") if s.epilogue] == ["swiglu(silu)"]
    assert not sites("graph")
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


COMPILE_FOR_SM90 = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchfx_eff import codegen
from torchfx_eff.kernels import quant_gemm, weight_only_triton as wt

def to_cubin(fn, types, constexprs):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm["cubin"]

ints = dict.fromkeys(["M", "N", "K", "M_BUCKET", "steps_per_split", "splits"] + [n for n in wt._gemm.arg_names + quant_gemm._scaled_mm.arg_names
                                                  if n.startswith("stride")], "i32")
pointers = {"X": "*bf16", "W": "*i8", "S": "*bf16", "Z": "*bf16", "B": "*bf16", "Out": "*bf16", "E": "*bf16",
            "G": "*bf16", "Part": "*fp32", "inv_k": "fp32", "eps": "fp32"}
flags = {"BITS": 8, "PART": 64, "HAS_BIAS": True, "NORM": True}
to_cubin(wt._gemv, {**ints, **pointers}, {**flags, "PDL": True, "STEP_BYTES": 256, "BLOCK_N": 16,
                                           "EPILOGUE": codegen.epilogue("glu_silu,add")})
to_cubin(wt._mma_gemm, {**ints, **pointers}, {"HAS_BIAS": True, "NORM": True, "BLOCK_M": 16, "BLOCK_N": 64,
         "STAGES": 4, "SPLIT": False, "EPILOGUE": codegen.epilogue("gelu_tanh,mul")})
to_cubin(wt._gemm, {**ints, **pointers, "W": "*i32"}, {"PART": 8, "HAS_BIAS": True, "NORM": True, "CHUNKS": 8,
         "BLOCK_M": 16, "BLOCK_N": 64, "SPLIT": True, "EPILOGUE": codegen.epilogue("")})
to_cubin(wt._split_sum, {**ints, **pointers}, {"BITS": 8, "HAS_BIAS": True, "NORM": True, "BLOCK_M": 16, "BLOCK_N": 64,
         "EPILOGUE": codegen.epilogue("glu_silu,add")})
to_cubin(wt._dequantize, {**ints, "W": "*i32", "S": "*bf16", "Z": "*bf16", "Out": "*bf16", "stride_on": "i32"},
         {"BITS": 4, "PART": 8, "CHUNKS": 4, "BLOCK_N": 16})
to_cubin(wt._gemv_int4, {**ints, **pointers, "W": "*i32"}, {"PART": 8, "HAS_BIAS": False, "NORM": True, "ASM": True,
         "PDL": True, "BLOCK_N": 8, "STEP_BYTES": 1024, "EPILOGUE": codegen.epilogue("add")})  # sm90
to_cubin(wt._epilogue_pass, {**ints, "Y": "*bf16", "Out": "*bf16", "E": "*fp32", "stride_ym": "i32"},
         {"EPILOGUE": codegen.epilogue("glu_gelu,add"), "BLOCK_M": 32, "BLOCK_N": 64})
pointers = {"A": "*i8", "B": "*i8", "SA": "*fp32", "SB": "*fp32", "Bias": "*bf16", "Out": "*fp32", "E": "*bf16"}
to_cubin(quant_gemm._scaled_mm, {**ints, **pointers}, {"HAS_BIAS": True, "EVEN_K": True, "ACC": triton.language.int32,
        "EPILOGUE": codegen.epilogue("relu,add"), "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8})
print("compiled")
"""


def test_generated_epilogues_compile_into_the_kernels_for_hopper(cache_dir):
    """Without a GPU Triton still compiles for one (to a cubin, with its bundled ptxas): the generated function, passed
    as a tl.constexpr, is valid compiled Triton, not only interpreted."""
    compiles_for_sm90(COMPILE_FOR_SM90)
