"""torch's own multi-head attention, which Dynamo leaves as one opaque call, spelled as the ops it computes: the packed
QKV linear, SDPA and the output linear (and for the encoder layer's fast path its norms, residuals and feed-forward),
so that the linear and attention matchers see them. Under Dynamo nn.MultiheadAttention calls
F.multi_head_attention_forward (its native fast path is not taken), and nn.TransformerEncoderLayer under no_grad calls
its fast path, torch._transformer_encoder_layer_fwd, with the masks merged (nn.MultiheadAttention.merge_masks).
Attention with a mask ([L, Lk] or one per head) and a key padding is spelled, with packed or separate projection
weights, and where its attention weights are used the softmax is spelled out beside them; other forms (bias_k/v,
add_zero_attn, ...) stay one call, and unspelled() says why."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import bind, call, fake, sym

MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
            "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
            "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
            "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
ENCODER_LAYER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
                      "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2",
                      "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")


def packed_projections(query, key, value, w, b, embed_dim: int):
    """q, k and v through nn.MultiheadAttention's packed projection w [3E, E] (q, k and v rows): one linear when
    query, key and value are one tensor; else one for q and one for k and v when they are one, or one each, over
    constant slices of w."""
    if query is key is value:
        qkv = F.linear(query, w, b).chunk(3, -1)
        return qkv[0], qkv[1], qkv[2]
    rows = lambda t, i, n: None if t is None else t[i * embed_dim:(i + n) * embed_dim]
    q = F.linear(query, rows(w, 0, 1), rows(b, 0, 1))
    if key is value:
        kv = F.linear(key, rows(w, 1, 2), rows(b, 1, 2)).chunk(2, -1)
        return q, kv[0], kv[1]
    return q, F.linear(key, rows(w, 1, 1), rows(b, 1, 1)), F.linear(value, rows(w, 2, 1), rows(b, 2, 1))


def attention(q, k, v, out_w, out_b, heads: int, mask=None, pad=None, is_causal: bool = False, dtype=None,
              weights: tuple[bool, float] | None = None):
    """Projected q [B, L, E], k and v [B, Lk, E] split into heads, SDPA, the output projection. mask ([L, Lk], or
    [B, H, L, Lk]) and the key padding pad [B, Lk] are added to the scores as nn.MultiheadAttention takes them: float,
    or bool with True where not attended (-inf in dtype). weights (averaged over heads, q's scale): the softmax
    spelled out, and (output, its probabilities [B, L, Lk] averaged or [B, H, L, Lk]) returned, as F.mha's explicit
    path computes them."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    mask, pad = (_additive(m, dtype) for m in (mask, pad))
    if pad is not None:
        pad = pad[:, None, None, :]
        mask = pad if mask is None else mask + pad
    if weights:
        averaged, scale = weights
        scores = (q * scale) @ k.transpose(-1, -2)
        probs = (scores if mask is None else scores + mask).softmax(-1)
        out = F.linear((probs @ v).transpose(1, 2).flatten(-2), out_w, out_b)
        return out, probs.mean(1) if averaged else probs
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return F.linear(out.transpose(1, 2).flatten(-2), out_w, out_b)


def _additive(mask, dtype):
    """A bool mask (dtype set: True where not attended) as 0 and -inf; a float one (dtype None) as it is."""
    if mask is None or dtype is None:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def encoder_layer(x, a: dict, masks: dict):
    """torch._transformer_encoder_layer_fwd's value (a: its arguments by name, masks: attention()'s mask
    arguments): nn.TransformerEncoderLayer's forward, pre- or post-norm."""
    E, eps = a["embed_dim"], a["eps"]
    attend = lambda h: attention(*packed_projections(h, h, h, a["qkv_weight"], a["qkv_bias"], E), a["proj_weight"],
                                 a["proj_bias"], a["num_heads"], **masks)
    ffn = lambda h: F.linear((F.gelu if a["use_gelu"] else F.relu)(F.linear(h, a["ffn_weight_1"], a["ffn_bias_1"])),
                             a["ffn_weight_2"], a["ffn_bias_2"])
    norm1 = lambda h: F.layer_norm(h, (E,), a["norm_weight_1"], a["norm_bias_1"], eps)
    norm2 = lambda h: F.layer_norm(h, (E,), a["norm_weight_2"], a["norm_bias_2"], eps)
    if a["norm_first"]:
        x = x + attend(norm1(x))
        return x + ffn(norm2(x))
    x = norm1(x + attend(x))
    return norm2(x + ffn(x))


def decompose(gm: fx.GraphModule) -> int:
    """Replace each call spelled here by its spelling (its first output, where the call returns the attention weights
    too). Returns how many calls were replaced; unspelled() says why the others were not."""
    done = 0
    for node in list(gm.graph.nodes):
        spell = SPELLINGS.get(node.target) if node.op == "call_function" else None
        if spell and not isinstance(found := spell(node), str):
            done += _inline(gm, node, *found)
    return done


def unspelled(node: fx.Node) -> str | None:
    """Why decompose() leaves node, one of torch's attention calls, whole (None: not such a call)."""
    spell = SPELLINGS.get(node.target) if node.op == "call_function" else None
    found = spell and (node.meta.get(FAILED) or spell(node))
    return found if isinstance(found, str) else None


def _mha(node):
    """F.multi_head_attention_forward (seq-first [L, B, E]) as nn.MultiheadAttention calls it: (its arguments, the
    spelling), or why not."""
    a = bind(node, MHA_ARGS)
    given = [n for n in ("bias_k", "bias_v", "static_k", "static_v") if a.get(n) is not None]
    x, pad, heads = a["query"], a.get("key_padding_mask"), a["num_heads"]
    # as F.mha: is_causal (a hint beside the mask) replaces the mask unless the weights or a key padding are computed
    is_causal = bool(a.get("is_causal")) and not a.get("need_weights", True) and pad is None
    mask = None if is_causal else a.get("attn_mask")
    (L, B), (Lk, _) = _first_two_sizes(x), _first_two_sizes(a["key"])
    mask_shape = [L, Lk] if fake(mask) is None or fake(mask).dim() == 2 else [B * heads, L, Lk]
    why = _refusal(node, x, a["key"], a["value"], {"mask": (mask, mask_shape), "key padding": (pad, [B, Lk])}) or (
        f"{given[0]} is given" if given else "add_zero_attn is set" if a.get("add_zero_attn") else
        "dropout is on" if a.get("dropout_p", 0.0) and a.get("training", True) else None)
    if why:
        return why
    as_bool = lambda m: fake(x).dtype if m is not None and fake(m).dtype == torch.bool else None
    E = fake(a["out_proj_weight"]).shape[1]
    used = {u.args[1] for u in node.users}  # the getitems of (output, attention weights)
    weights = (a.get("average_attn_weights", True), (E // heads) ** -0.5) if 1 in used else None

    def spelled(p):
        batch_first = {}  # one per tensor, so that the projections see which of query, key and value are one
        for n in ("query", "key", "value"):
            batch_first.setdefault(a[n], p[n].transpose(0, 1))
        query, key, value = (batch_first[a[n]] for n in ("query", "key", "value"))
        if a.get("use_separate_proj_weight"):
            b = p.get("in_proj_bias")
            q, k, v = (F.linear(t, p[f"{n}_proj_weight"], None if b is None else b[i * E:(i + 1) * E])
                       for i, (t, n) in enumerate(zip((query, key, value), "qkv")))
        else:
            q, k, v = packed_projections(query, key, value, p["in_proj_weight"], p.get("in_proj_bias"), E)
        m = None if is_causal else p.get("attn_mask")
        m = m.unflatten(0, (-1, heads)) if m is not None and len(mask_shape) == 3 else m  # [B, H, L, Lk]
        out = attention(q, k, v, p["out_proj_weight"], p.get("out_proj_bias"), heads, m, p.get("key_padding_mask"),
                        is_causal, as_bool(mask) or as_bool(pad), weights)
        return (out[0].transpose(0, 1), out[1]) if weights else out.transpose(0, 1)
    return a, spelled


def _encoder_layer(node):
    """torch._transformer_encoder_layer_fwd (batch-first), nn.TransformerEncoderLayer's no_grad fast path."""
    a = bind(node, ENCODER_LAYER_ARGS)
    masks = _merged_mask(a["src"], a.get("mask"), a.get("mask_type"), a["num_heads"])
    if why := _refusal(node, a["src"], a["src"], a["src"], masks):
        return why
    return a, lambda p: encoder_layer(p["src"], p, _by_role(masks, p.get("mask"), fake(a["src"]).dtype))


def _merged_mask(x, mask, mask_type, heads: int) -> dict:
    """The fast path's mask by its role, as nn.MultiheadAttention.merge_masks makes it: mask_type 1 a [B, L] key
    padding, 2 a [B, H, L, L] mask (the [L, L] mask expanded, plus the key padding if both are given)."""
    B, L = _first_two_sizes(x)
    if mask is None:
        return {}
    role, shape = ("key padding", [B, L]) if mask_type == 1 else ("mask", [B, heads, L, L])
    return {role: (mask, shape)}


def _by_role(masks: dict, mask, dtype) -> dict:
    """attention()'s mask arguments for the fast path's one mask."""
    if not masks:
        return {}
    (role, (node, _)), = masks.items()
    return {"mask" if role == "mask" else "pad": mask, "dtype": dtype if fake(node).dtype == torch.bool else None}


SPELLINGS = {F.multi_head_attention_forward: _mha, torch._transformer_encoder_layer_fwd: _encoder_layer}
FAILED = "torchfx_eff_mha_failed"  # node.meta key: why _inline gave up on it
SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")  # the call's, given to its spelling


def _first_two_sizes(x: fx.Node) -> list:
    """A 3-D x's first two sizes (sympy)."""
    return [sym(s) for s in fake(x).shape[:2]] if fake(x) is not None and fake(x).dim() == 3 else [None, None]


def _refusal(node, query, key, value, masks: dict) -> str | None:
    """Why a call cannot be spelled as attention over 3-D query, key and value with masks {role: (node or None, the
    shape it must have)}, each float or bool, all of one dtype (F.mha's rule)."""
    if any(fake(t) is None or fake(t).dim() != 3 or fake(t).is_nested for t in (query, key, value)):
        return "its query, key or value is not a 3-D tensor"
    tuple_users = node.users if fake(node) is None else ()  # (output, attention weights)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in tuple_users):
        return "its (output, attention weights) tuple is used whole"
    given = {name: (m, shape) for name, (m, shape) in masks.items() if m is not None}
    for name, (m, shape) in given.items():
        t = fake(m)
        if t is None or [sym(s) for s in t.shape] != shape or not (t.is_floating_point() or t.dtype == torch.bool):
            return f"its {name} is not a float or bool tensor of shape {tuple(shape)}"
    if len({fake(m).dtype for m, _ in given.values()}) > 1:
        return "its mask and key padding differ in dtype"
    return None


def _inline(gm: fx.GraphModule, node: fx.Node, args: dict, spelled) -> bool:
    """Trace spelled(node's args by name, each node a proxy) into gm before node, give the new nodes fake values and
    node's source location, and route node's value (a tuple's: its getitem(0)s) to the result. Where tracing or the
    fake values fail, the new nodes go, node stays and unspelled() gives the error."""
    graph, before = gm.graph, set(gm.graph.nodes)
    tracer = fx.proxy.GraphAppendingTracer(graph)
    fake_mode = fake(node.args[0]).fake_mode  # the graph's (detect_fake_mode would find the tracing context's)
    values = {}
    try:
        with graph.inserting_before(node):
            out = spelled({k: fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v for k, v in args.items()})
            out = tuple(o.node for o in out) if isinstance(out, tuple) else (out.node,)
        for n in graph.nodes:
            if n not in before:  # in graph order, so each one's inputs have values
                n.meta.update({k: v for k, v in node.meta.items() if k in SOURCE_META})
                with fake_mode:
                    values[n] = n.meta["example_value"] = call(n, lambda m: values.get(m, m.meta.get("example_value")))
    except Exception as e:  # e.g. an op the fake tensors refuse
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        node.meta[FAILED] = f"spelling it failed: {type(e).__name__}: {e}"
        return False
    for user in list(node.users) if fake(node) is None else []:  # (output, weights): their getitems
        user.replace_all_uses_with(out[user.args[1]])
        graph.erase_node(user)
    node.replace_all_uses_with(out[0])
    graph.erase_node(node)
    return True
