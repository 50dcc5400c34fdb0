"""PyTorch's SDPA backends as candidates: the same math, pinned to one kernel with sdpa_kernel()."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..cost import formulas
from ..passes.graph import fake
from .attention_inputs import site_key, site_mask
from .registry import Implementation, Replacement, needs_device, needs_dtype, register

BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cpu": SDPBackend.FLASH_ATTENTION,  # the fused CPU kernel dispatches under the flash backend
}
_KERNEL = {SDPBackend.FLASH_ATTENTION: "sdpa_flash", SDPBackend.EFFICIENT_ATTENTION: "sdpa_efficient",
           SDPBackend.CUDNN_ATTENTION: "sdpa_cudnn"}
_CUDA_CHECKS = {
    "sdpa_flash": "can_use_flash_attention",
    "sdpa_cudnn": "can_use_cudnn_attention",
    "sdpa_efficient": "can_use_efficient_attention",
}


@torch.library.custom_op("torchfx_eff::sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
         scale: float | None, enable_gqa: bool, backend: str) -> torch.Tensor:
    with sdpa_kernel(BACKENDS[backend]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
    return out.contiguous()  # backends differ in output strides; the fake promises contiguous


@sdpa.register_fake
def _(q, k, v, attn_mask, is_causal, scale, enable_gqa, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def sdpa_site(q, k, v, mask, mask_fill, is_causal, scale, enable_gqa, k_transposed, backend):
    """An attention site as one pinned SDPA call."""
    return torch.ops.torchfx_eff.sdpa.default(q, site_key(k, k_transposed), v,
                                              site_mask(mask, mask_fill, q.dtype, additive=True), is_causal, scale,
                                              enable_gqa, backend)


def fake_mask(site):
    """The site's mask as one fake tensor, as sdpa_site passes it (None when it has none)."""
    masks = site.mask if isinstance(site.mask, tuple) else (site.mask,)
    fill = (fake(site.mask_fill[0]), site.mask_fill[1]) if site.mask_fill else None
    return site_mask(tuple(fake(m) for m in masks if m is not None), fill, site.dtype, additive=True)


def _sdpa_refusal(site) -> str | None:
    return "softcap (tanh capping of the scores) is not an SDPA argument" if site.softcap is not None else None


def _flash_refusal(site) -> str | None:
    """Flash attention's own limits, beyond what torch's check reports on stderr only."""
    if site.masked or site.dtype not in (torch.float16, torch.bfloat16):
        return "flash takes no attn_mask and only fp16/bf16"
    if not site.size("D") == site.size("Dv") <= 256:
        return "flash needs equal q/k and v head dims of at most 256"
    return None


def _cuda_applicable(name: str):
    def applicable(site, spec) -> str | None:
        if reason := (needs_device(site, "cuda") or needs_dtype(site, (torch.float16, torch.bfloat16, torch.float32))
                      or _sdpa_refusal(site)):
            return reason
        if name == "sdpa_flash" and (reason := _flash_refusal(site)):
            return reason
        # torch's own check is the authority; it explains a refusal only on stderr, hence the generic reason
        k = fake(site.k).transpose(-2, -1) if site.k_transposed else fake(site.k)
        params = torch.backends.cuda.SDPAParams(fake(site.q), k, fake(site.v), fake_mask(site), 0.0,
                                                site.is_causal, site.enable_gqa)
        ok = getattr(torch.backends.cuda, _CUDA_CHECKS[name])(params, False)
        return None if ok else f"torch.backends.cuda.{_CUDA_CHECKS[name]} refused this shape/dtype/layout"

    return applicable


def _dispatch_order(spec) -> list[SDPBackend]:
    """torch's priority order; since 2.9 torch tries cuDNN first on Hopper (measured here: an unpinned SDPA
    call runs at cuDNN's speed on the H100), which the global order does not show."""
    order = list(map(SDPBackend, torch._C._get_sdp_priority_order()))
    if spec.name in ("h100", "h200") and torch.__version__ >= (2, 9):
        order.remove(SDPBackend.CUDNN_ATTENTION)
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    return order


def _cudnn_admits(site, spec) -> bool:
    if site.device.type == "cuda":
        return _cuda_applicable("sdpa_cudnn")(site, spec) is None
    return site.dtype in (torch.float16, torch.bfloat16) and site.size("D") % 8 == 0 and site.size("D") <= 256


def dispatched_cost(site, spec):
    """The original SDPA call, costed as the kernel PyTorch's dispatcher would pick on the spec's device:
    on CUDA the first fused backend in torch's priority order (ahead of math) whose rules admit the site."""
    if spec.type != "cuda":
        return formulas.attention("sdpa_cpu")(site, spec)
    admits = {
        SDPBackend.FLASH_ATTENTION: lambda: _flash_refusal(site) is None,
        SDPBackend.EFFICIENT_ATTENTION: lambda: site.size("D") % 8 == 0 and site.size("Dv") % 8 == 0,
        SDPBackend.CUDNN_ATTENTION: lambda: _cudnn_admits(site, spec),
    }
    for backend in _dispatch_order(spec):
        if backend == SDPBackend.MATH:  # always applies; backends after it are never reached
            break
        if backend in admits and admits[backend]():
            return formulas.attention(_KERNEL[backend])(site, spec)
    return formulas.attention("sdpa_math")(site, spec)


def _cpu_applicable(site, spec) -> str | None:
    if reason := (needs_device(site, "cpu") or needs_dtype(site, (torch.float32, torch.bfloat16, torch.float16))
                  or _sdpa_refusal(site)):
        return reason
    if any(fake(n).dim() != 4 for n in (site.q, site.k, site.v)):
        return "the fused CPU kernel takes 4-D q/k/v only"
    return None


def _replace(name: str):
    def replace(site) -> Replacement:
        return Replacement(sdpa_site, (site.q, site.k, site.v, site.mask, site.mask_fill, site.is_causal, site.scale,
                                       site.enable_gqa, site.k_transposed, name))

    return replace


def _pinned_cost(name: str):
    """The kernel's roofline plus the Python dispatch of the torchfx_eff::sdpa custom op around it."""
    kernel = formulas.attention(name)
    return lambda site, spec: kernel(site, spec) + spec.custom_op_s


for _name in _CUDA_CHECKS:
    register(Implementation(_name, "attention", _cuda_applicable(_name), _pinned_cost(_name), _replace(_name)))
register(Implementation("sdpa_cpu", "attention", _cpu_applicable, _pinned_cost("sdpa_cpu"), _replace("sdpa_cpu")))
