"""What every attention replacement reads, put in SDPA's terms. Traceable: Inductor fuses the mask arithmetic."""
from __future__ import annotations

import functools
import operator

import torch


def site_mask(mask, mask_fill, dtype: torch.dtype, additive: bool = False):
    """One SDPA mask from a site's additive terms and masked_fill: bool (True attends) when every part is a
    bool, else float (added to the scores). -inf fills become bools; finite fills (finfo.min) stay additive,
    so a fully masked row averages over its keys exactly as the original softmax does. additive: a bool mask as
    0 / -inf in `dtype`, as SDPA converts it on every call (ATen's convert_boolean_attn_mask: a fill and two
    elementwise kernels a call on CUDA); converted here, Inductor fuses it into the mask's own computation."""
    terms = list(mask) if isinstance(mask, (list, tuple)) else ([] if mask is None else [mask])
    if mask_fill is not None:
        cond, value = mask_fill
        terms.append(~cond if value == float("-inf") else torch.where(cond, value, 0.0).to(dtype))
    if not terms:
        return None
    if all(t.dtype == torch.bool for t in terms) and not additive:
        return functools.reduce(operator.and_, terms)
    # no tensor constants: the mask may be a fake tensor (cost rules run on fakes, which reject real tensors)
    as_float = [t if t.is_floating_point() else torch.zeros_like(t, dtype=dtype).masked_fill(~t, float("-inf"))
                for t in terms]
    return functools.reduce(operator.add, as_float)


def site_key(k, k_transposed: bool):
    """k as [..., Lk, D]; eager attention hands it over as k^T (a view Inductor folds away)."""
    return k.transpose(-2, -1) if k_transposed else k
