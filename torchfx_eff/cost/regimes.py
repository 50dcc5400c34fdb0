"""Shape regimes: a linear (or experts) site whose row count (Site.rows: M, S) is symbolic serves both decode (a few
rows, bandwidth-bound) and prefill (many rows, compute-bound), and the best implementation may differ between them."""
from __future__ import annotations

SPLIT_ROWS = 16  # decode at or below (GEMV-like kernels), prefill above (GEMM-like)
PREFILL_ROWS = 512  # the prefill size to cost at when the example is a decode step


def regime_hints(site) -> dict[str, dict] | None:
    """{label: hints} for costing the site at a decode and a prefill size, or None when M is static. The
    example's own sizes stand for the regime they fall in; the other regime moves M's symbols (all to 1 but
    the largest, which carries the rows)."""
    if site.rows is None:
        return None
    rows, name = site.dims[site.rows], site.rows
    free = sorted(rows.free_symbols, key=lambda s: (site.hints.get(s, 0), str(s)))
    if not free:
        return None
    at_example = int(rows.xreplace(site.hints))
    ones = {**site.hints, **{s: 1 for s in free}}
    decode = site.hints if at_example <= SPLIT_ROWS else ones
    prefill = site.hints if at_example > SPLIT_ROWS else {**ones, free[-1]: PREFILL_ROWS}
    m_decode, m_prefill = int(rows.xreplace(decode)), int(rows.xreplace(prefill))
    if not m_decode <= SPLIT_ROWS < m_prefill:
        return None
    return {f"{name}<={SPLIT_ROWS} (at {name}={m_decode})": decode, f"{name}>{SPLIT_ROWS} (at {name}={m_prefill})": prefill}
