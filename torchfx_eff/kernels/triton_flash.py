"""`triton_flash`: flash attention in Triton, one kernel for every site the matchers find.

Forward: one program per (query block, batch x head); keys are streamed in blocks with an online softmax
in base 2 and fp32 accumulation. Key blocks every row of the block sees in full run without masks; only the
causal diagonal and the ragged tail pay for them. FA4's conditional rescaling (the running max moves, and the
accumulator is rescaled, only when some row's max grew by more than 2^RESCALE_LOG2) is a switch; see below.

Decode (few query rows, long KV): flash-decoding. The rows of a whole GQA group (group x Lq) share one
program so each K/V block is read once per KV head; keys are split across programs, each writes a partial
output and log-sum-exp, and a combine kernel reduces them.

Supported: causal (SDPA's top-left alignment) or not, a bool or float mask of any broadcast shape (a per-key
bias vector is read once per key block), softcap, GQA/MQA, any head dim (padded to a power of two by masked
loads), fp16/bf16 (fp32 accumulation) and fp32 (IEEE dots), ragged lengths.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..cost import formulas
from ..passes.graph import fake
from .attention_inputs import site_key, site_mask
from .registry import Implementation, Replacement, autotuned, needs_dtype, register, sm_count

INTERPRETING = triton.knobs.runtime.interpret  # kernels run on CPU tensors through Triton's interpreter
# FA4's conditional rescaling tolerates a stale running max up to 2^RESCALE_LOG2 below the true one. Measured on
# the H100 (bench gpu_attention): 452 TFLOP/s with a threshold of 8 against 488 rescaling every block, since the
# block-wide branch stalls Triton's software pipeline (FA4 skips per warp). 0 rescales every block, no branch.
RESCALE_LOG2 = 0.0
BIAS_NONE, BIAS_FLOAT, BIAS_KEEP = 0, 1, 2
INTERPRETER_SLOWDOWN = 1e4  # no mask, float mask added to the scores, bool mask (True attends)


@triton.jit
def _attend(acc, m_i, l_i, q, K, V, Bias, bias_rows, q_pos, lo, hi, Lk, sm_scale, softcap,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn,
            D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, BIAS: tl.constexpr, BIAS_PER_KEY: tl.constexpr,
            SOFTCAP: tl.constexpr, MASKED: tl.constexpr, RESCALE: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over keys [lo, hi). MASKED blocks check key bounds and causality; the others may not
    need to. Returns the unnormalized accumulator, the running max (log2 units) and the running sum."""
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if MASKED or D != BLOCK_D:
            kt = tl.load(k_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
        else:
            kt = tl.load(k_ptrs)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        if SOFTCAP or BIAS == 1:  # scores in natural units first, then to log2 units
            s = s * sm_scale
            if SOFTCAP:  # softcap * tanh(s / softcap), tanh through the sigmoid
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            to_log2 = LOG2E
        else:  # the scale folds into the exponent's multiply-add
            to_log2 = sm_scale * LOG2E
        if BIAS != 0:
            if BIAS_PER_KEY:
                b = tl.load(Bias + offs_n * stride_bn, mask=offs_n < Lk, other=0)[None, :]
            else:
                b = tl.load(Bias + bias_rows[:, None] + offs_n[None, :] * stride_bn, mask=offs_n[None, :] < Lk, other=0)
            if BIAS == 1:  # finfo.min stays finite in log2 units (a fully masked row averages, as in eager)
                b = b.to(tl.float32)
                s = tl.where(b == float("-inf"), b, tl.maximum(s + b, -2.0e38))
            else:
                s = tl.where(b != 0, s, float("-inf"))
        if MASKED:
            ok = offs_n[None, :] < Lk
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * to_log2)
        if RESCALE > 0:  # FA4: rescale only when some row's max grew past the tolerance
            # -inf - -inf would be nan for rows that saw no key yet: compare against a finite floor instead
            if tl.max(m_new - tl.maximum(m_i, -3.0e38), 0) > RESCALE:
                alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
        else:
            alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.exp2(s * to_log2 - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        l_i = l_i + tl.sum(p, 1)
        if MASKED or DV != BLOCK_DV:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
        else:
            v = tl.load(v_ptrs)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_i, l_i


@triton.jit
def _flash_fwd(Q, K, V, Bias, Out, sm_scale, softcap, H, GROUP, Lq, Lk,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bm, stride_bn,
               stride_ob, stride_oh, stride_om, stride_od, LK_BUCKET,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, BIAS: tl.constexpr,
               BIAS_PER_KEY: tl.constexpr, SOFTCAP: tl.constexpr, RESCALE: tl.constexpr, IEEE: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Bias += b * stride_bb + h * stride_bh
    bias_rows = tl.minimum(offs_m, Lq - 1) * stride_bm  # padding rows read a real row, then are dropped
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = Lk
    full = (Lk // BLOCK_N) * BLOCK_N  # key blocks inside Lk that every row of this block sees in full
    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
        full = tl.minimum(full, (start_m * BLOCK_M // BLOCK_N) * BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, Bias, bias_rows, offs_m, 0, full, Lk, sm_scale, softcap,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, D, DV, BLOCK_N, BLOCK_D,
                            BLOCK_DV, CAUSAL, BIAS, BIAS_PER_KEY, SOFTCAP, False, RESCALE, IEEE)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, Bias, bias_rows, offs_m, full, hi, Lk, sm_scale, softcap,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, D, DV, BLOCK_N, BLOCK_D,
                            BLOCK_DV, CAUSAL, BIAS, BIAS_PER_KEY, SOFTCAP, True, RESCALE, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows with no key attended are 0, as in SDPA
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV))


@triton.jit
def _decode_split(Q, K, V, Bias, Part, Lse, sm_scale, softcap, H, GROUP, Lq, Lk, keys_per_split,
                  stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bm, stride_bn,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, BIAS: tl.constexpr,
                  BIAS_PER_KEY: tl.constexpr, SOFTCAP: tl.constexpr, RESCALE: tl.constexpr, IEEE: tl.constexpr):
    """One (batch, KV head, key split): rows are the group's heads x query positions. Writes the split's
    normalized partial output and its log2-sum-exp to Part[b, h, m, split] and Lse[b, h, m, split]."""
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    Hkv = H // GROUP
    b, hk = bhk // Hkv, bhk % Hkv
    rows = tl.arange(0, BLOCK_M)
    h = hk * GROUP + rows // Lq
    m = rows % Lq
    row_ok = rows < GROUP * Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    Bias += b * stride_bb + hk * GROUP * stride_bh
    last = tl.minimum(rows, GROUP * Lq - 1)  # padding rows read a real row, then are dropped
    bias_rows = (last // Lq) * stride_bh + (last % Lq) * stride_bm
    lo = split * keys_per_split
    hi = tl.minimum(Lk, lo + keys_per_split)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, Bias, bias_rows, m, lo, hi, hi, sm_scale, softcap,
                            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, D, DV, BLOCK_N, BLOCK_D,
                            BLOCK_DV, CAUSAL, BIAS, BIAS_PER_KEY, SOFTCAP, True, RESCALE, IEEE)
    nsplit = tl.num_programs(1)
    part = (b * H + h) * Lq + m  # [BLOCK_M] row index into [B, H, Lq]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(Lse + part * nsplit + split, lse, mask=row_ok)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    p_ptrs = Part + (part[:, None] * nsplit + split) * DV + offs_dv[None, :]
    tl.store(p_ptrs, out, mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _decode_combine(Part, Lse, Out, H, Lq, stride_ob, stride_oh, stride_om, stride_od, NSPLIT,
                    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0)  # over B * H * Lq
    b, h, m = row // (H * Lq), (row // Lq) % H, row % Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(Lse + row * NSPLIT + offs_s, mask=offs_s < NSPLIT, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    part = tl.load(Part + (row * NSPLIT + offs_s[:, None]) * DV + offs_dv[None, :],
                   mask=(offs_s[:, None] < NSPLIT) & (offs_dv[None, :] < DV), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = Out + b * stride_ob + h * stride_oh + m * stride_om + offs_dv * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_dv < DV)


def _hopper_configs():
    """Block shapes and pipeline depths worth trying on Hopper; pruned by head dim before timing."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2),
                                 (64, 64, 4, 3), (64, 32, 4, 2), (128, 32, 8, 2), (64, 128, 4, 3)]]


def _prune(configs, named_args, **kwargs):
    """Tiles that fit shared memory: 256-wide heads only with small key blocks."""
    d = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
    keep = [c for c in configs if c.kwargs["BLOCK_N"] * d <= 128 * 128 and c.kwargs["BLOCK_M"] * d <= 128 * 128]
    return keep or configs[-1:]


_flash_fwd_tuned = autotuned(_flash_fwd, _hopper_configs(), ["D", "DV", "CAUSAL", "BIAS", "SOFTCAP", "LK_BUCKET"], _prune)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def _bias_args(mask, B, H, Lq, Lk):
    """(tensor, kind, 4 strides over [B, H, Lq, Lk], per-key) for a broadcastable SDPA mask."""
    if mask is None:
        return None, BIAS_NONE, (0, 0, 0, 0)
    mask = mask.expand(B, H, Lq, Lk)  # a view: broadcast dims get stride 0
    kind = BIAS_KEEP if mask.dtype == torch.bool else BIAS_FLOAT
    if kind == BIAS_KEEP:
        mask = mask.view(torch.uint8)
    return mask, kind, _strides4(mask)


def _dims(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"triton_flash takes 4-D [B, H, L, D] q/k/v, got {q.dim()}/{k.dim()}/{v.dim()}-D")
    (B, H, Lq, D), (_, Hkv, Lk, _), DV = q.shape, k.shape, v.shape[-1]
    if H % Hkv:
        raise ValueError(f"triton_flash: {H} query heads are not a multiple of {Hkv} KV heads")
    return B, H, Hkv, Lq, Lk, D, DV


def decode_splits(B: int, Hkv: int, Lk: int, block_n: int, sms: int) -> int:
    """Key splits so that B x Hkv x splits programs fill the GPU about twice, each with >= 2 key blocks."""
    return max(1, min(triton.cdiv(2 * sms, B * Hkv), triton.cdiv(Lk, 2 * block_n)))


def uses_decode(Lq: int, group: int, Lk: int) -> bool:
    """Split-K pays when the group's rows fit one tile and the keys are many."""
    return group * Lq <= 64 and Lk >= 256


def _empty_out(q, v):
    """[B, H, Lq, Dv] with [B, Lq, H, Dv] memory: models transpose it back, and then no copy is made."""
    B, H, Lq, _ = q.shape
    return q.new_empty(B, Lq, H, v.shape[-1]).transpose(1, 2)


def flash_attention(q, k, v, mask=None, is_causal=False, scale=None, softcap=None, block=None):
    """softmax(cap(q k^T * scale) + mask) v for 4-D q/k/v (GQA when k/v have fewer heads). mask follows SDPA
    (bool: True attends; float: added) and broadcasts to [B, H, Lq, Lk]. `block` fixes (BLOCK_M, BLOCK_N)
    instead of autotuning (always so under the interpreter)."""
    B, H, Hkv, Lq, Lk, D, DV = _dims(q, k, v)
    out = _empty_out(q, v)
    if B * H * Lq == 0:
        return out
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bias, kind, bstr = _bias_args(mask, B, H, Lq, Lk)
    group = H // Hkv
    flags = {"D": D, "DV": DV, "BLOCK_D": max(16, triton.next_power_of_2(D)),
             "BLOCK_DV": max(16, triton.next_power_of_2(DV)), "CAUSAL": bool(is_causal), "BIAS": kind,
             "SOFTCAP": softcap is not None, "RESCALE": RESCALE_LOG2, "IEEE": q.dtype == torch.float32}
    qkvb = (q, k, v, bias if bias is not None else q)
    scalars = (sm_scale, float(softcap or 1.0), H, group, Lq, Lk)
    strides = (*q.stride(), *k.stride(), *v.stride(), *bstr)
    if uses_decode(Lq, group, Lk):
        block_m = max(16, triton.next_power_of_2(group * Lq))
        block_n = (block or (0, 64))[1]
        sms = sm_count(q.device)
        nsplit = decode_splits(B, Hkv, Lk, block_n, sms)
        per_split = triton.cdiv(triton.cdiv(Lk, nsplit), block_n) * block_n
        nsplit = triton.cdiv(Lk, per_split)
        part = torch.empty(B, H, Lq, nsplit, DV, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, Lq, nsplit, dtype=torch.float32, device=q.device)
        per_key = bstr[2] == 0 and (bstr[1] == 0 or group == 1)
        _decode_split[(B * Hkv, nsplit)](*qkvb, part, lse, *scalars, per_split, *strides, BLOCK_M=block_m, BLOCK_N=block_n,
                                         BIAS_PER_KEY=per_key, num_warps=4, **flags)
        _decode_combine[(B * H * Lq,)](part, lse, out, H, Lq, *out.stride(), nsplit, DV=DV,
                                       BLOCK_S=max(2, triton.next_power_of_2(nsplit)), BLOCK_DV=flags["BLOCK_DV"])
        return out
    per_key = bstr[2] == 0
    lk_bucket = triton.next_power_of_2(Lk)
    if block is None and not INTERPRETING:
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)
        _flash_fwd_tuned[grid](*qkvb, out, *scalars, *strides, *out.stride(), lk_bucket, BIAS_PER_KEY=per_key, **flags)
    else:
        block_m, block_n = block or (64, 64)
        _flash_fwd[(triton.cdiv(Lq, block_m), B * H)](*qkvb, out, *scalars, *strides, *out.stride(), lk_bucket, BLOCK_M=block_m,
                                                      BLOCK_N=block_n, BIAS_PER_KEY=per_key, **flags)
    return out


@torch.library.custom_op("torchfx_eff::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                       scale: float | None, softcap: float | None) -> torch.Tensor:
    return flash_attention(q, k, v, mask, is_causal, scale, softcap)


@flash_attention_op.register_fake
def _(q, k, v, mask, is_causal, scale, softcap):
    return _empty_out(q, v)


def flash_site(q, k, v, mask, mask_fill, is_causal, scale, softcap, k_transposed):
    """An attention site as one triton_flash call."""
    return torch.ops.torchfx_eff.flash_attention.default(q, site_key(k, k_transposed), v,
                                                         site_mask(mask, mask_fill, q.dtype), is_causal, scale, softcap)


def _applicable(site, spec) -> str | None:
    if site.device.type != "cuda" and not INTERPRETING:
        return f"needs a cuda tensor (or TRITON_INTERPRET=1), site is on {site.device.type}"
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if INTERPRETING else ())
    if reason := needs_dtype(site, dtypes):
        return reason + "; fp32 sites stay with SDPA (this kernel's fp32 dots would skip the tensor cores)"
    q, k = fake(site.q), fake(site.k)
    if q.dim() != 4 or k.dim() != 4 or fake(site.v).dim() != 4:
        return "q, k and v must be 4-D [B, H, L, D]"
    if max(site.size("D"), site.size("Dv")) > 256:
        return f"head dims {site.size('D')}/{site.size('Dv')} above 256"
    if site.size("H") % site.size("Hkv"):
        return "query heads are not a multiple of KV heads"
    return None


def _cost(site, spec):
    """The kernel's roofline plus the custom op's Python dispatch. Off CUDA the kernel runs in Triton's
    interpreter, thousands of times slower: only an explicit Config.attention=("triton_flash",) takes it there."""
    cost = formulas.attention("triton_flash")(site, spec) + spec.custom_op_s
    return cost if spec.type == "cuda" else cost * INTERPRETER_SLOWDOWN


def _replace(site) -> Replacement:
    return Replacement(flash_site, (site.q, site.k, site.v, site.mask, site.mask_fill, site.is_causal, site.scale,
                                    site.softcap, site.k_transposed))


register(Implementation("triton_flash", "attention", _applicable, _cost, _replace))
