"""`original`: keep the site's own computation. It is always applicable and is what the others must beat."""
from ..cost import formulas
from .registry import Implementation, register
from .sdpa import dispatched_cost

always = lambda site, spec: None

register(Implementation("original", "linear", always, formulas.linear_dense, replace=None))
register(Implementation("original", "experts", always, formulas.experts_dense, replace=None))


def attention_as_spelled(site, spec):
    """The SDPA op costs what torch dispatches it to, eager attention its separate passes; repeated K/V
    heads (GQA spelled as repeat_kv) cost their copy on top."""
    cost = dispatched_cost(site, spec) if site.op == "sdpa" else formulas.attention_unfused(site, spec)
    return cost + formulas.repeat_kv(site, spec) if site.kv_repeat > 1 else cost


register(Implementation("original", "attention", always, attention_as_spelled, replace=None))
