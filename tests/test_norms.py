"""RMSNorm folded into the weight-only Triton linears that read it (passes/norms.py): the kernels against an fp64
reference at every path, the fold across architectures against the unfolded compile, and the guards that keep a
norm as it is."""
import pytest
import torch
import transformers as T
from helpers import BIG, VOCAB, WEIGHT_ONLY_PATHS, compiled, force_weight_only_path, make_model, sites, sqnr_ref

import torchfx_eff
from torchfx_eff.kernels import weight_only_triton
from torchfx_eff.kernels.int4_weight_only import pack_int4
from torchfx_eff.kernels.weight_only_triton import weight_only_matmul


@pytest.fixture
def triton_path(monkeypatch):
    """The cost model takes interpreted Triton kernels for GPU-fast, so that the weight-only linears run them."""
    monkeypatch.setattr(weight_only_triton, "INTERPRETER_SLOWDOWN", 1e-3)


def _packed(bits, group_size, N, K, dtype):
    """Packed weights and their dequantized fp64 [N, K] value (int4: K padded to whole groups with code 8 = 0)."""
    g = torch.Generator().manual_seed(1)
    if bits == 8:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        s = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(dtype)
        return (q, s, None), q.double() * s.double()[:, None]
    Kp = K + -K % group_size
    codes = torch.randint(0, 16, (N, Kp), generator=g)
    codes[:, K:] = 8
    s = (torch.rand(N, Kp // group_size, generator=g) * 0.02 + 1e-3).to(dtype)
    z = (torch.randn(N, Kp // group_size, generator=g) * 0.01).to(dtype)
    w = (codes.double().reshape(N, -1, group_size) - 8) * s.double()[..., None] + z.double()[..., None]
    return (pack_int4(codes, group_size), s, z), w.reshape(N, Kp)[:, :K]


@pytest.mark.parametrize("path,M", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("bits,group_size,K", [(8, 0, 200), (4, 64, 192), (4, 32, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_fold_the_norm_like_an_fp64_reference(path, M, bits, group_size, K, dtype, monkeypatch):
    """rms_norm(x, g, eps) @ W^T + bias, at each path (K = 100 is not a multiple of g32: the GEMV pads x and g)."""
    force_weight_only_path(monkeypatch, path)
    packed, w = _packed(bits, group_size, 40, K, dtype)
    x = (torch.randn(M, K) * 3).to(dtype)
    g, bias = (torch.rand(K) + 0.5).to(dtype), torch.randn(40).to(dtype)
    out = weight_only_matmul(x, *packed, bias, bits, group_size or 64, norm_weight=g, norm_eps=1e-5)
    xf = x.double()
    ref = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-5) * g.double()) @ w.T + bias.double()
    assert out.dtype == dtype and out.shape == (M, 40)
    assert ((out.double() - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 1e-5)


def _compile_both(model, inputs, **config):
    """Outputs compiled without and with the fold, and the second compile's norm records."""
    outs = {}
    for fold in (False, True):
        torch._dynamo.reset()
        torchfx_eff.reset()
        with torch.no_grad():
            out = compiled(model, fuse_norms=fold, **config)(**inputs)
        outs[fold] = out.logits
    return outs[False], outs[True], sites("norm")


@pytest.mark.parametrize("fuse_siblings", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_layers_norms_fold_into_their_linears(family, fuse_siblings, triton_path):
    """Both norms of every layer (before attention, before the MLP) fold into the linears reading them; the outputs
    equal the unfolded compile's at fp16 rounding, and each fold passed the gate at the lossless budget."""
    model = make_model(family, BIG, torch.float16)
    unfolded, folded, norms = _compile_both(model, {"input_ids": torch.randint(0, VOCAB, (1, 1))},
                                            fuse_siblings=fuse_siblings)
    assert [s.status for s in norms] == ["rewritten"] * 2 * BIG["layers"], [s.reason for s in norms]
    assert all(s.sqnr_db >= 50.0 for s in norms)
    readers = 1 if fuse_siblings else None
    assert all(f"the {readers or n} weight-only" in s.reason for s, n in zip(norms, [3, 2] * BIG["layers"]))
    assert sqnr_ref(unfolded, folded) >= 45.0


def _zoo(name):
    ids = torch.randint(3, 128, (1, 3))
    if name == "gemma3":  # output * (1 + weight), in fp32, then cast back
        cfg = T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=4)
        return T.Gemma3ForCausalLM(cfg), {"input_ids": ids}
    if name == "mistral":
        cfg = T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128)
        return T.MistralForCausalLM(cfg), {"input_ids": ids}
    cfg = T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128)  # x * rsqrt, no mean-0
    return T.T5ForConditionalGeneration(cfg), {"input_ids": ids, "decoder_input_ids": ids[:, :2]}


@pytest.mark.parametrize("name", ["gemma3", "mistral", "t5"])
def test_other_spellings_of_rms_norm_fold(name, triton_path):
    """Gemma's (1 + weight) and T5's norm of the uncast input are the same pattern; fp32 models agree with the
    unfolded compile to fp32 rounding. Norms that something other than a linear reads stay, with the reason."""
    model, inputs = _zoo(name)
    unfolded, folded, norms = _compile_both(model.eval(), inputs)
    assert [s for s in norms if s.status == "rewritten"], [s.reason for s in norms]
    assert all(s.status == "rewritten" or "is not a weight-only Triton linear" in s.reason for s in norms)
    assert sqnr_ref(unfolded, folded) >= 90.0


class NormThenLinear(torch.nn.Module):
    def __init__(self, k=64, n=48, residual=False):
        super().__init__()
        self.norm, self.proj, self.residual = torch.nn.RMSNorm(k, eps=1e-6), torch.nn.Linear(k, n), residual
        self.norm.weight.data = torch.rand(k) + 0.5

    def forward(self, x):
        h = self.norm(x)
        y = self.proj(h)
        return torch.cat([y, h], -1) if self.residual else y


def test_a_norm_read_by_other_ops_stays_with_the_reason(triton_path):
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        compiled(NormThenLinear(residual=True), fuse_norms=True)(x)
    [norm] = sites("norm")
    assert norm.status == "kept" and "is not a weight-only Triton linear" in norm.reason


def test_torch_rms_norm_module_folds_and_fuse_norms_false_keeps_it(triton_path):
    """nn.RMSNorm traces to F.rms_norm, folded too (fuse_norms is on by default); with fuse_norms=False no norm is
    looked for."""
    model, x = NormThenLinear(), torch.randn(2, 3, 64)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model)(x)
        [norm] = sites("norm")
        torch._dynamo.reset()
        torchfx_eff.reset()
        compiled(model, fuse_norms=False)(x)
    assert norm.status == "rewritten", norm.reason
    assert sqnr_ref(ref, out) >= 30.0  # int8 weights against the fp32 module
    assert not sites("norm")


def test_a_failing_fold_keeps_the_norm_and_the_graphs_other_rewrites(triton_path, monkeypatch):
    from torchfx_eff.passes import norms

    def broken(reader, norm):
        raise RuntimeError("no fold today")

    monkeypatch.setattr(norms, "folded", broken)
    model, x = NormThenLinear(), torch.randn(2, 3, 64)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, fuse_norms=True)(x)
    [record] = sites("norm")
    assert record.status == "fallback" and "no fold today" in record.reason
    assert [s.status for s in sites("linear")] == ["rewritten"] and not sites("graph")
    assert sqnr_ref(ref, out) >= 30.0
