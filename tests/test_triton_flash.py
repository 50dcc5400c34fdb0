"""triton_flash against an fp64 PyTorch reference (Triton's interpreter on CPU: small shapes, fp32/fp16), and
end to end through the backend."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import compiled, make_model, matched, sites, sqnr_ref

from torchfx_eff.kernels import triton_flash
from torchfx_eff.kernels.triton_flash import flash_attention, uses_decode

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # out-of-bounds garbage shows up as overflow
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}  # max abs error, outputs are O(1)


def reference(q, k, v, mask=None, is_causal=False, scale=None, softcap=None):
    """fp64 attention with SDPA's semantics (top-left causal; rows that attend to nothing are 0)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask.double() if mask.is_floating_point() else s.masked_fill(~mask, -math.inf)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _mask(kind, B, H, Lq, Lk, dtype):
    return {
        None: None,
        "float": lambda: torch.randn(1, H, Lq, Lk, dtype=dtype),  # broadcast over the batch
        "bool": lambda: torch.rand(Lq, Lk) > 0.3,  # 2-D, broadcast over batch and heads
        "per_key": lambda: torch.randn(B, 1, 1, Lk, dtype=dtype),  # KV compaction's per-key bias
        "padding": lambda: (torch.arange(Lk) < Lk - 5).expand(B, 1, Lq, Lk),  # right-padded keys
    }[kind]() if kind else None


# (B, H, Hkv, Lq, Lk, D, causal, mask): ragged lengths, GQA/MQA, head dims that need padding, decode
CASES = [
    (2, 4, 2, 37, 53, 32, False, None),
    (1, 2, 2, 70, 70, 64, True, None),
    (1, 4, 4, 65, 129, 80, True, "float"),
    (2, 2, 1, 50, 90, 16, False, "bool"),
    (1, 4, 2, 33, 33, 96, True, "per_key"),
    (2, 4, 1, 1, 300, 64, False, "per_key"),  # decode, MQA
    (1, 8, 2, 3, 500, 32, True, "bool"),  # decode, 3 query rows, causal (top-left: mostly masked)
    (2, 4, 2, 1, 259, 48, False, "padding"),  # decode, ragged split
    (1, 2, 2, 20, 40, 24, False, "padding"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_fp64_reference(case, dtype):
    B, H, Hkv, Lq, Lk, D, causal, kind = case
    q, k, v = (torch.randn(B, h, L, D, dtype=dtype) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    mask = _mask(kind, B, H, Lq, Lk, dtype)
    out = flash_attention(q, k, v, mask, causal)
    assert out.shape == (B, H, Lq, D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, causal), atol=TOL[dtype], rtol=0)


def test_decode_path_is_taken_for_few_rows_and_long_kv():
    assert uses_decode(Lq=1, group=4, Lk=4096) and uses_decode(Lq=3, group=4, Lk=500)
    assert not uses_decode(Lq=128, group=1, Lk=4096) and not uses_decode(Lq=1, group=1, Lk=100)


@pytest.mark.parametrize("block", [(16, 16), (64, 32)])
def test_block_shapes_and_softcap(block):
    q, k, v = torch.randn(1, 2, 45, 32), torch.randn(1, 2, 77, 32), torch.randn(1, 2, 77, 40)
    out = flash_attention(q, k, v, None, False, 0.3, 5.0, block=block)
    torch.testing.assert_close(out.double(), reference(q, k, v, None, False, 0.3, 5.0), atol=2e-5, rtol=0)


@pytest.mark.parametrize("threshold", [triton_flash.RESCALE_LOG2, 0.0], ids=["conditional", "always"])
def test_running_max_growing_across_blocks_is_rescaled_exactly(threshold, monkeypatch):
    monkeypatch.setattr(triton_flash, "RESCALE_LOG2", threshold)
    """Scores rise by ~40 (log2 units) from the first key block to the last, so the running max moves past
    the 2^8 tolerance many times; a late small rise stays under it (the stale-max path)."""
    Lk = 256
    q = torch.ones(1, 1, 16, 16)
    k = torch.linspace(0, 8, Lk)[:, None].expand(Lk, 16).reshape(1, 1, Lk, 16).contiguous()
    k[..., -40:, :] = k[..., -41, :] + 0.01  # a plateau: growth below the threshold
    v = torch.randn(1, 1, Lk, 16)
    out = flash_attention(q, k, v, block=(16, 16))
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=0)


def test_fully_masked_rows_are_zero_like_sdpa():
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    mask = torch.ones(8, 24, dtype=torch.bool)
    mask[3] = False
    out = flash_attention(q, k, v, mask)
    assert out[:, :, 3].abs().max() == 0 and torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=0)


def test_strided_inputs_and_output_layout():
    """q/v in [B, L, H, D] memory and k as a transposed view are read in place; the output has [B, L, H, D]
    memory so that a model's transpose back is free."""
    q = torch.randn(2, 19, 4, 32).transpose(1, 2)
    kt = torch.randn(2, 2, 32, 41)
    v = torch.randn(2, 41, 2, 32).transpose(1, 2)
    out = flash_attention(q, kt.transpose(-2, -1), v)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out.double(), reference(q, kt.transpose(-2, -1), v), atol=2e-5, rtol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match="multiple of 3 KV heads"):
        flash_attention(torch.randn(1, 4, 8, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))


@pytest.fixture
def flash_estimated_fastest(monkeypatch):
    """Cost the interpreted kernel as if it ran at GPU speed, so that the cost model picks it on CPU."""
    monkeypatch.setattr(triton_flash, "INTERPRETER_SLOWDOWN", 1e-3)


class GQAAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backend_rewrites_sdpa_site_to_triton_flash(dtype, flash_estimated_fastest):
    q, k, v = torch.randn(2, 4, 24, 32, dtype=dtype), torch.randn(2, 2, 40, 32, dtype=dtype), torch.randn(2, 2, 40, 32, dtype=dtype)
    mask = torch.randn(2, 1, 24, 40, dtype=dtype)
    model = GQAAttention()
    with torch.no_grad():
        out = compiled(model, attention=("triton_flash",))(q, k, v, mask)
    (s,) = sites("attention")
    assert (s.status, s.chosen) == ("rewritten", "triton_flash"), s.reason
    assert sqnr_ref(model(q, k, v, mask).float(), out.float()) > (100 if dtype == torch.float32 else 50)


def test_backend_rewrites_every_eager_llama_site_and_output_matches(flash_estimated_fastest):
    model = make_model("llama", attn="eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(model, attention=("triton_flash",))(ids).logits
    attention = matched("attention")
    assert attention and all((s.status, s.chosen) == ("rewritten", "triton_flash") for s in attention)
    assert sqnr_ref(ref, out) > 100


def test_cost_model_leaves_the_interpreter_alone_on_cpu():
    """Off CUDA the kernel runs interpreted: it is a candidate with an estimate, never the automatic choice."""
    q = torch.randn(1, 2, 64, 32, dtype=torch.float16)
    with torch.no_grad():
        compiled(GQAAttention())(q, q, q, None)
    (s,) = sites("attention")
    flash = next(c for c in s.candidates if c.name == "triton_flash")
    assert flash.applicable and s.chosen != "triton_flash"
    assert flash.estimate_us > 1000 * min(c.estimate_us for c in s.candidates if c.applicable)


def test_refuses_fp32_off_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_flash, "INTERPRETING", False)
    q = torch.randn(1, 2, 8, 16)
    with torch.no_grad():
        compiled(GQAAttention(), attention=("triton_flash",))(q, q, q, None)
    (s,) = sites("attention")
    flash = next(c for c in s.candidates if c.name == "triton_flash")
    assert not flash.applicable and "cuda" in flash.reason


class CappedAttention(torch.nn.Module):
    """Gemma 2's eager spelling: scale, softcap, additive mask, softmax in fp32."""

    def forward(self, q, k, v, mask):
        s = torch.tanh(q @ k.transpose(-2, -1) * 0.25 / 20.0) * 20.0 + mask
        return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def test_softcap_site_is_rewritten_to_triton_flash(flash_estimated_fastest):
    q, k, v = torch.randn(1, 2, 16, 16) * 4, torch.randn(1, 2, 16, 16) * 4, torch.randn(1, 2, 16, 16)
    mask = torch.randn(1, 1, 16, 16)
    model = CappedAttention()
    with torch.no_grad():
        out = compiled(model, attention=("triton_flash",))(q, k, v, mask)
    (s,) = sites("attention")
    assert (s.status, s.chosen) == ("rewritten", "triton_flash"), s.reason
    assert sqnr_ref(model(q, k, v, mask), out) > 100
