"""CUDA only: SDPA backend candidates on a bf16 tiny Llama at sizes where the fused kernels apply."""
import pytest
import torch
from helpers import compiled, count_calls, make_model, matched, sites, sqnr_ref

import torchfx_eff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_BACKENDS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
# head dim 64 (256 / 4 heads), sequence 256: flash, cuDNN and memory-efficient SDPA all accept this on sm80+
GPU_SIZES = {"hidden": 256, "inter": 512, "layers": 2, "heads": 4, "kv_heads": 2}


def test_llama_bf16_sdpa_candidates_apply_and_rewrites_pass_the_gate():
    model = make_model("llama", GPU_SIZES, torch.bfloat16).cuda()
    ids = torch.randint(0, 128, (1, 256), device="cuda")
    with torch.no_grad(), count_calls(model) as counts:
        ref = model(ids).logits
    with torch.no_grad():
        out = compiled(model)(ids).logits
    report = torchfx_eff.last_report()
    assert sites("graph") == [], report
    attention = matched("attention")
    assert len(attention) == counts["attention"] == GPU_SIZES["layers"], report
    for s in attention:
        cands = {c.name: c for c in s.candidates}
        for name in CUDA_BACKENDS:
            assert cands[name].estimate_us is not None and cands[name].estimate_us > 0
        # GQA is folded (the site reads 2 KV heads with enable_gqa); each backend takes that, or says why not
        assert (s.hints["H"], s.hints["Hkv"]) == (GPU_SIZES["heads"], GPU_SIZES["kv_heads"])
        for name in CUDA_BACKENDS:
            assert cands[name].applicable or cands[name].reason
        assert not cands["sdpa_cpu"].applicable and "cpu" in cands["sdpa_cpu"].reason
        assert s.status in ("rewritten", "kept"), s.reason
        if s.status == "rewritten":
            assert s.chosen in CUDA_BACKENDS and s.sqnr_db >= 35.0  # lossless for bf16: same math, another kernel
    for s in matched("linear"):
        int8 = next(c for c in s.candidates if c.name == "int8_weight_only")
        assert not int8.applicable and "cpu" in int8.reason  # the int8 kernel is CPU-only
    assert len(matched("linear")) == counts["linear"]
    assert sqnr_ref(ref, out) >= 35.0
    assert (ref.float().argmax(-1) == out.float().argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_each_pinned_backend_matches_eager(backend):
    """Force each backend (Config.attention=(name,)) on a bare SDPA call; the gate checks it, and the output must
    match eager SDPA to bf16 rounding."""
    torch.manual_seed(0)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        ref = Attn()(q, k, v)
        out = compiled(Attn(), attention=(backend,), calibrate=True)(q, k, v)
    [s] = matched("attention")
    cands = {c.name: c for c in s.candidates}
    assert cands[backend].applicable, cands[backend].reason
    assert cands[backend].measured_us is not None and cands[backend].measured_us > 0
    assert all(not c.applicable for n, c in cands.items() if n not in (backend, "original"))
    assert s.status in ("rewritten", "kept") and (s.status == "kept" or s.chosen == backend)
    assert sqnr_ref(ref, out) >= 35.0


def test_self_attention_with_one_tensor_for_q_k_v():
    """sdpa(x, x, x): q, k and v are one graph node."""
    class SelfAttn(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)

    x = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = SelfAttn()(x)
        out = compiled(SelfAttn())(x)
    assert sites("graph") == [], [s.reason for s in sites("graph")]
    [s] = matched("attention")
    assert all(c.applicable for c in s.candidates if c.name in CUDA_BACKENDS), [(c.name, c.reason) for c in s.candidates]
    assert sqnr_ref(ref, out) >= 35.0


def test_flash_refusal_says_why():
    class MaskedAttn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(256, 256, device="cuda", dtype=torch.bool).tril()
    with torch.no_grad():
        compiled(MaskedAttn())(q, k, v, mask)
    [s] = matched("attention")
    flash = next(c for c in s.candidates if c.name == "sdpa_flash")
    assert not flash.applicable  # flash attention takes no attn_mask
    assert "mask" in flash.reason, flash.reason


def test_pinned_backend_under_inductor_matches_eager(monkeypatch):
    """The rewritten graph, with torchfx_eff::sdpa inside, compiles with Inductor on CUDA and stays correct."""
    import dataclasses

    from torchfx_eff.kernels import registry

    impl = registry._REGISTRY["attention"]["sdpa_cudnn"]  # estimated fastest, to drive this path
    monkeypatch.setitem(registry._REGISTRY["attention"], "sdpa_cudnn",
                        dataclasses.replace(impl, cost=lambda site, spec: impl.cost(site, spec) / 100))

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2

    q, k, v = (torch.randn(2, 16, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.randn(2, 1, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = Attn()(q, k, v, mask)
        out = compiled(Attn(), attention=("sdpa_cudnn",), inner="inductor")(q, k, v, mask)
    [s] = matched("attention")
    assert s.status == "rewritten" and s.chosen == "sdpa_cudnn", s.reason
    assert sqnr_ref(ref, out) >= 35.0


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "float_mask"])
def test_original_attention_costed_as_the_kernel_torch_dispatches_to(masked):
    """The original SDPA call's estimate equals the pinned estimate of the backend torch really picks for it
    (asked of torch's own dispatcher), less the custom op's dispatch."""
    from torch.nn.attention import SDPBackend

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)

    q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.randn(1, 1, 512, 512, device="cuda", dtype=torch.bfloat16) if masked else None
    with torch.no_grad():
        compiled(Attn())(q, k, v, mask)
    [s] = matched("attention")
    est = {c.name: c.estimate_us for c in s.candidates}
    picked = SDPBackend(torch._fused_sdp_choice(q, k, v, mask, is_causal=mask is None))
    name = {SDPBackend.FLASH_ATTENTION: "sdpa_flash", SDPBackend.CUDNN_ATTENTION: "sdpa_cudnn",
            SDPBackend.EFFICIENT_ATTENTION: "sdpa_efficient"}[picked]
    dispatch_us = torchfx_eff.cost.detect(q.device).custom_op_s * 1e6  # what only the pinned custom op pays
    assert est["original"] == pytest.approx(est[name] - dispatch_us)


def test_eager_attention_is_fused_into_a_cuda_kernel():
    model = make_model("llama", GPU_SIZES, torch.bfloat16, attn="eager").cuda()
    ids = torch.randint(0, 128, (1, 256), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model)(ids).logits
    attention = matched("attention")
    assert len(attention) == GPU_SIZES["layers"]
    for s in attention:
        assert s.op == "eager" and s.status == "rewritten" and s.chosen in (*CUDA_BACKENDS, "triton_flash"), s.reason
        assert s.sqnr_db >= 35.0
    assert sqnr_ref(ref, out) >= 35.0


@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 300, 64, True), (1, 4, 4, 129, 257, 80, False),
                                   (1, 4, 2, 200, 200, 256, True), (2, 16, 4, 1, 3000, 128, False),
                                   (1, 8, 1, 4, 5000, 96, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_flash_compiled_for_the_gpu_matches_sdpa(shape, dtype):
    """The kernel as compiled for the GPU (autotuned, bf16 arithmetic for real), against fp32 SDPA."""
    from torchfx_eff.kernels.triton_flash import flash_attention

    B, H, Hkv, Lq, Lk, D, causal = shape
    q = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Hkv, Lk, D, device="cuda", dtype=dtype) for _ in range(2))
    mask = torch.randn(B, 1, 1, Lk, device="cuda", dtype=dtype)  # per-key bias
    full = mask.float().expand(B, 1, Lq, Lk)
    if causal:  # SDPA takes a mask or is_causal, not both: the reference spells causality in the mask
        full = full.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=full,
                                                           enable_gqa=True)
    out = flash_attention(q, k, v, mask, causal)
    assert sqnr_ref(ref.cpu(), out.float().cpu()) > 40


def test_llama_bf16_attention_rewritten_to_triton_flash_under_inductor(monkeypatch):
    import dataclasses

    from torchfx_eff.kernels import registry

    impl = registry._REGISTRY["attention"]["triton_flash"]  # estimated fastest, to drive this path
    monkeypatch.setitem(registry._REGISTRY["attention"], "triton_flash",
                        dataclasses.replace(impl, cost=lambda site, spec: impl.cost(site, spec) / 100))
    model = make_model("llama", GPU_SIZES, torch.bfloat16).cuda()
    ids = torch.randint(0, 128, (2, 256), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model, attention=("triton_flash",), inner="inductor")(ids).logits
    attention = matched("attention")
    assert attention and all(s.chosen == "triton_flash" for s in attention), torchfx_eff.last_report()
    assert sqnr_ref(ref.float().cpu(), out.float().cpu()) > 30
