"""torch's multi-head attention calls (nn.MultiheadAttention, nn.TransformerEncoderLayer's fast path), opaque in
Dynamo's graph, spelled as linear + SDPA + linear: the spelled graph computes what the module computes, and the
forms the spelling does not cover stay one call."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import compiled, matched, sites, sqnr_ref

import torchfx_eff
from torchfx_eff.passes import mha

E, HEADS, L, B = 32, 4, 6, 2
OPAQUE = tuple(mha.SPELLINGS)


class SelfAttention(torch.nn.Module):
    def __init__(self, batch_first=False, return_weights=False, kdim=None, vdim=None, bias=True, add_bias_kv=False,
                 add_zero_attn=False, **call):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(E, HEADS, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                                kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.call, self.return_weights = call, return_weights

    def forward(self, x, mask=None, pad=None):
        out, weights = self.attn(x, x, x, attn_mask=mask, key_padding_mask=pad, **self.call)
        return (out, weights) if self.return_weights else out


def _batch_first():
    return SelfAttention(batch_first=True, need_weights=False)


class CrossAttention(SelfAttention):
    """x attending to a memory of Lk = L + 2 positions (keys and values one tensor, or two)."""

    def __init__(self, values_apart=False, **kw):
        super().__init__(**kw)
        self.values_apart = values_apart

    def forward(self, x, mask=None, pad=None):
        memory = torch.cat([x, x[:2]]).flip(0)
        key = memory if self.attn.kdim == E else memory[..., :self.attn.kdim]
        value = memory if self.attn.vdim == E and not self.values_apart else memory.sin()[..., :self.attn.vdim]
        return self.attn(x, key, value, attn_mask=mask, key_padding_mask=pad, need_weights=False)[0]


def _encoder(norm_first=False, activation="relu"):
    return torch.nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, activation=activation,
                                            batch_first=True, norm_first=norm_first)


class Encoder(torch.nn.Module):
    """An encoder layer called with masks by keyword, as nn.TransformerEncoder calls it."""

    def __init__(self, norm_first=False, activation="relu", is_causal=False):
        super().__init__()
        self.layer, self.is_causal = _encoder(norm_first, activation), is_causal

    def forward(self, x, mask=None, pad=None):
        return self.layer(x, src_mask=mask, src_key_padding_mask=pad, is_causal=self.is_causal)


def _random_biases(model):
    """nn.MultiheadAttention starts its biases at zero: random ones, so that a bias taken from the wrong rows shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_()
    return model


def _mask(kind: str, keys=L):
    causal = torch.nn.Transformer.generate_square_subsequent_mask(keys)[-L:]  # float: 0 and -inf
    return {"none": None, "float": causal, "bool": causal.isinf(), "random": torch.randn(L, keys),
            "per head": torch.randn(B * HEADS, L, keys)}[kind]


def _spelled(model, args, grad: bool):
    """(output of the graph after mha.decompose, targets before, targets after)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["before"] = [n.target for n in gm.graph.nodes]
        mha.decompose(gm)
        gm.recompile()
        seen["after"] = [n.target for n in gm.graph.nodes]
        return gm.forward

    torch._dynamo.reset()
    with contextlib.nullcontext() if grad else torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(*args)
    return out, seen["before"], seen["after"]


def _pad(dtype=torch.bool, keys=L):
    pad = torch.zeros(B, keys, dtype=torch.bool)
    pad[0, -2:] = True  # the first sequence's last two keys are padding
    return pad if dtype == torch.bool else torch.zeros(B, keys).masked_fill(pad, float("-inf"))


CASES = {  # name: (model, mask kind, autograd on)
    "mha seq-first": (lambda: SelfAttention(need_weights=False), "none", True),
    "mha weights not used": (lambda: SelfAttention(), "none", True),
    "mha float mask": (lambda: SelfAttention(need_weights=False), "random", True),
    "mha bool mask": (lambda: SelfAttention(need_weights=False), "bool", True),
    "mha causal hint": (lambda: SelfAttention(need_weights=False, is_causal=True), "float", True),
    "mha causal hint, weights not used": (lambda: SelfAttention(is_causal=True), "float", True),
    "mha no bias": (lambda: SelfAttention(bias=False, need_weights=False), "none", True),
    "mha key padding": (lambda: SelfAttention(need_weights=False), "pad", True),
    "mha key padding and mask, float": (lambda: SelfAttention(need_weights=False), "float pad", True),
    "mha key padding and mask, bool": (lambda: SelfAttention(), "bool pad", True),
    "mha key padding, causal hint": (lambda: SelfAttention(need_weights=False, is_causal=True), "bool pad", True),
    "mha batch-first, no_grad": (_batch_first, "none", False),
    "encoder post-norm relu fast path": (lambda: _encoder(), "none", False),
    "encoder pre-norm gelu fast path": (lambda: _encoder(True, "gelu"), "none", False),
    "encoder with autograd": (lambda: _encoder(True, "gelu"), "none", True),
    "cross-attention": (lambda: CrossAttention(), "none", True),
    "cross-attention, values apart, no bias": (lambda: CrossAttention(True, bias=False), "none", True),
    "cross-attention, mask and key padding": (lambda: CrossAttention(), "cross bool pad", False),
    "cross-attention, separate projection weights": (lambda: CrossAttention(kdim=24, vdim=16), "float pad", True),
    "mha mask per head": (lambda: SelfAttention(need_weights=False), "per head", True),
    "mha batch-first, no_grad, key padding": (_batch_first, "pad", False),
    "mha batch-first, no_grad, float mask": (_batch_first, "random", False),
    "mha batch-first, no_grad, bool mask and key padding": (_batch_first, "bool pad", False),
    "encoder fast path, key padding": (lambda: Encoder(), "pad", False),
    "encoder fast path, causal mask": (lambda: Encoder(is_causal=True), "float", False),
    "encoder fast path, mask and key padding": (lambda: Encoder(True, "gelu"), "bool pad", False),
}


@pytest.mark.parametrize("name", CASES)
def test_torch_attention_is_spelled_as_linear_sdpa_linear_computing_the_same(name):
    make, mask_kind, grad = CASES[name]
    torch.manual_seed(0)
    model = _random_biases(make().eval())
    seq_first = isinstance(model, SelfAttention) and not model.attn.batch_first
    x = torch.randn(L, B, E) if seq_first else torch.randn(B, L, E)
    keys = L + 2 if isinstance(model, CrossAttention) else L
    kind = mask_kind.replace(" pad", "").replace("cross ", "")
    mask = _mask(kind, keys) if kind not in ("none", "pad") else None
    pad = _pad(mask.dtype if mask is not None else torch.bool, keys)
    args = (x, mask, pad) if "pad" in mask_kind else (x, mask)
    with contextlib.nullcontext() if grad else torch.no_grad():
        ref = model(*args)
    out, before, after = _spelled(model, args, grad)
    fast_path = "fast path" in name  # the encoder layer's: nn.MultiheadAttention's is not taken under Dynamo
    assert (torch._transformer_encoder_layer_fwd if fast_path else F.multi_head_attention_forward) in before
    assert not any(t in OPAQUE for t in after)
    assert after.count(F.scaled_dot_product_attention) == 1
    projections = 2 if not isinstance(model, CrossAttention) else 4 if model.values_apart or model.attn.kdim != E else 3
    assert after.count(F.linear) == projections + 2 * ("encoder" in name)  # and the feed-forward's
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["none", "float mask and key padding", "bool key padding", "per head"])
def test_attention_weights_used_are_spelled_beside_the_output(masks, average):
    """Returned attention weights: the softmax spelled out (F.mha's explicit path), the output and the weights both
    what the module returns; the projections are linear sites, the attention a miss that says why."""
    torch.manual_seed(0)
    model = _random_biases(SelfAttention(return_weights=True, average_attn_weights=average).eval())
    x = torch.randn(L, B, E)
    mask = {"none": None, "per head": _mask("per head"), "bool key padding": None}.get(masks, _mask("random"))
    pad = _pad(torch.float32) if masks == "float mask and key padding" else _pad() if "padding" in masks else None
    ref = model(x, mask, pad)
    out, before, after = _spelled(model, (x, mask, pad), grad=True)
    assert F.multi_head_attention_forward in before and not any(t in OPAQUE for t in after)
    assert after.count(F.linear) == 2 and F.scaled_dot_product_attention not in after
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)
    with torch.no_grad():
        compiled(model)(x, mask, pad)
    assert len(matched("linear")) == 2
    (miss,) = sites("attention")
    assert miss.status == "missed" and "softmax output is not consumed by one matmul" in miss.reason


LEFT_WHOLE = {  # forms the spelling does not cover: (model, call args) -> still one call, still the module's value
    "add_zero_attn": (lambda: SelfAttention(add_zero_attn=True, need_weights=False), lambda x: (x,)),
    "bias_k and bias_v": (lambda: SelfAttention(add_bias_kv=True, need_weights=False), lambda x: (x,)),
}


@pytest.mark.parametrize("name", LEFT_WHOLE)
def test_forms_the_spelling_does_not_cover_stay_one_call(name):
    make, call_args = LEFT_WHOLE[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(L, B, E)
    args = call_args(x)
    out, before, after = _spelled(model, args, grad=True)
    assert any(t in OPAQUE for t in after)
    torch.testing.assert_close(out, model(*args))
    compiled(model)(*args)
    (miss,) = sites("attention")
    assert miss.status == "missed" and REASONS[name] in miss.reason


REASONS = {"add_zero_attn": "add_zero_attn is set", "bias_k and bias_v": "bias_k is given"}


def test_encoder_layers_fast_path_through_the_backend_rewrites_their_linears_and_attention():
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 512, dropout=0.0, batch_first=True),
                                        2, enable_nested_tensor=False).eval().to(torch.bfloat16)
    x = torch.randn(1, 2, 256, dtype=torch.bfloat16)  # decode-sized, where int8 beats bf16 on CPU
    with torch.no_grad():
        ref, out = model(x), compiled(model)(x)
    linears, attention = matched("linear"), matched("attention")
    assert len(linears) == 2 * 4 and len(attention) == 2
    assert all(s.status == "rewritten" for s in linears)
    assert sqnr_ref(ref.double(), out.double()) > 30


@pytest.mark.parametrize("masks", ["none", "key padding", "causal mask and key padding"])
@pytest.mark.parametrize("grad", [False, True], ids=["fast path", "autograd"])
def test_dynamic_sequence_lengths_keep_the_spelling(masks, grad):
    """Symbolic batch and sequence sizes, the masks' shapes checked against them symbolically."""
    torch.manual_seed(0)
    model = _random_biases(Encoder(norm_first=True).eval())
    c = torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(inner="eager")), dynamic=True)
    with contextlib.nullcontext() if grad else torch.no_grad():
        for b, n in ((2, 5), (3, 9)):
            x, pad = torch.randn(b, n, E), torch.zeros(b, n, dtype=torch.bool)
            pad[0, -2:] = True
            causal = torch.nn.Transformer.generate_square_subsequent_mask(n).isinf()  # bool, as the padding is
            mask = causal if "causal" in masks else None
            args = (x, mask, pad if "padding" in masks else None)
            torch.testing.assert_close(c(*args), model(*args), atol=1e-5, rtol=1e-5)
    assert matched("attention") and matched("linear") and not sites("attention", "missed")


def test_decoder_layers_cross_attention_linears_read_slices_of_the_packed_projection_and_release_it():
    torch.manual_seed(0)
    model = torch.nn.TransformerDecoderLayer(256, 4, 512, dropout=0.0, batch_first=True).eval().to(torch.bfloat16)
    x, memory = (torch.randn(1, n, 256, dtype=torch.bfloat16) for n in (2, 5))
    with torch.no_grad():
        ref, out = model(x, memory), compiled(model, release_weights=True)(x, memory)
    linears = matched("linear")
    assert len(linears) == 7 and all(s.status == "rewritten" for s in linears)  # cross-attention: q, then k and v
    assert {s.op for s in sites("weight", "released")} >= {"L_fn_modules_multihead_attn_parameters_in_proj_weight_"}
    assert len(matched("attention")) == 2
    assert sqnr_ref(ref.double(), out.double()) > 30


def test_a_spelling_that_fails_leaves_the_call_whole_and_says_why(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such op")

    monkeypatch.setattr(mha, "packed_projections", broken)
    torch.manual_seed(0)
    model, x = SelfAttention(need_weights=False).eval(), torch.randn(L, B, E)
    out, before, after = _spelled(model, (x,), grad=True)
    assert after == before  # the nodes traced before the failure are gone
    torch.testing.assert_close(out, model(x))
    compiled(model)(x)
    (miss,) = sites("attention")
    assert miss.status == "missed" and "spelling it failed: RuntimeError: no such op" in miss.reason
