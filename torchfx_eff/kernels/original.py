"""`original`: keep the site's own computation. It is always applicable and is what the others must beat."""
from ..cost import formulas
from .registry import Implementation, register
from .sdpa import dispatched_cost

always = lambda site, spec: None

register(Implementation("original", "linear", always, formulas.linear_dense, replace=None))


def attention_as_spelled(site, spec):
    """The SDPA op costs what torch dispatches it to; eager attention costs its separate passes."""
    return dispatched_cost(site, spec) if site.op == "sdpa" else formulas.attention_unfused(site, spec)


register(Implementation("original", "attention", always, attention_as_spelled, replace=None))
