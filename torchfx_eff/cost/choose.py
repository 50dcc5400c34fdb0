"""The chooser: list every candidate for a site with its estimate, and rank the applicable ones."""
from __future__ import annotations

from ..config import ACCURACY, Config
from ..kernels import Implementation, implementations
from ..kernels.registry import keeps_output_linear
from ..report import CandidateRecord
from .devices import DeviceSpec
from .formulas import epilogue, evaluate

# A rewrite must be estimated (or measured) this much faster than the original to be chosen: estimates
# are rough and every rewrite carries some risk.
MARGIN = 0.95
# Under Config.release_weights a packed candidate may be estimated up to this much slower than the original: any
# graph that keeps the original reads it, so it stays resident beside its packed copy. ATen's CPU int8/int4 pack
# matmuls are estimated ~3x slower than a bf16 GEMM at prefill sizes; interpreted kernels are far slower.
MEMORY_SLOWDOWN = 4.0


def _refusal(impl: Implementation, site, spec: DeviceSpec, config: Config) -> str | None:
    setting = config.family(site.kind)
    if impl.name != "original" and isinstance(setting, tuple) and impl.name not in setting:
        return f"not in Config.{site.kind}={setting}"
    if ACCURACY.index(config.accuracy) < ACCURACY.index(impl.accuracy):
        return f"needs accuracy={impl.accuracy!r} or looser (Config.accuracy={config.accuracy!r})"
    return impl.applicable(site, spec) or (keeps_output_linear(impl, site) if config.output_linear_8bit else None)


def candidates(site, spec: DeviceSpec, config: Config, hints: dict | None = None) -> list[tuple[Implementation, CandidateRecord]]:
    """Every implementation of the site's kind, with why it is not applicable and its estimate at `hints`
    (the example's sizes by default)."""
    hints = site.hints if hints is None else hints
    out = []
    for impl in implementations(site.kind):
        try:
            reason = _refusal(impl, site, spec, config)
        except Exception as e:  # a predicate that breaks on this site refuses it rather than the whole graph
            reason = f"applicability check failed: {type(e).__name__}: {e}"
        try:
            expr = impl.cost(site, spec)
            if getattr(site, "epilogue", None) is not None:  # fused into the kernel, or a pass of its own
                expr += epilogue(site, spec, impl.epilogue_fused_when(site))
            estimate, formula = evaluate(expr, hints) * 1e6, str(expr)
        except Exception as e:  # a formula that cannot be evaluated here still leaves the candidate listed
            estimate, formula = None, f"cost failed: {type(e).__name__}: {e}"
            reason = reason or formula
        out.append((impl, CandidateRecord(impl.name, reason is None, reason, estimate, formula=formula)))
    return out


def ranked(cands: list[tuple[Implementation, CandidateRecord]], memory_first: bool = False) -> list[tuple[Implementation, CandidateRecord]]:
    """Applicable candidates that beat the original by MARGIN (memory_first: that are at most MEMORY_SLOWDOWN times
    slower), fastest first, then the original."""
    original = next(c for c in cands if c[0].replace is None)
    if original[1].time_us is None:  # nothing to compare against: keep the original
        return [original]
    limit = original[1].time_us * (MEMORY_SLOWDOWN if memory_first else MARGIN)
    faster = [c for c in cands if c[1].applicable and c is not original and c[1].time_us is not None and c[1].time_us < limit]
    return sorted(faster, key=lambda c: c[1].time_us) + [original]
