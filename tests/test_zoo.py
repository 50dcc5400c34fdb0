"""More architectures, eager and SDPA attention: every attention call is one matched site, outputs match.

(Llama, Qwen2, GPT-2 and BERT are in test_backend.py.) Tiny random-init configs, no downloads.
"""
import pytest
import torch
import transformers as T
from helpers import compiled, count_calls, found_sites, linear_modules, matched, sites, sqnr_ref

import torchfx_eff


def _model(name: str, attn: str):
    ids = lambda n: torch.randint(3, 128, (1, n))
    if name == "mistral":
        cfg = T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, attn_implementation=attn)
        return T.MistralForCausalLM(cfg), {"input_ids": ids(8)}
    if name == "gemma3":  # sliding-window and full attention layers
        cfg = T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=4,
                                 attn_implementation=attn)
        return T.Gemma3ForCausalLM(cfg), {"input_ids": ids(8)}
    if name == "gemma2":  # scores soft-capped with tanh; sliding-window and full attention layers
        cfg = T.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=4,
                             attn_implementation=attn)
        return T.Gemma2ForCausalLM(cfg), {"input_ids": ids(8)}
    if name == "falcon":  # FalconLinear multiplies by self.weight.T (a matmul, not F.linear); Q/K/V in one linear
        cfg = T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                             new_decoder_architecture=True, vocab_size=128, attn_implementation=attn)
        return T.FalconForCausalLM(cfg), {"input_ids": ids(8)}
    if name == "t5":  # relative position bias added to the scores, no scaling; cross-attention
        cfg = T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128,
                         attn_implementation=attn)
        return T.T5ForConditionalGeneration(cfg), {"input_ids": ids(8), "decoder_input_ids": ids(4)}
    if name == "vit":
        cfg = T.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, attn_implementation=attn)
        return T.ViTModel(cfg), {"pixel_values": torch.randn(1, 3, 32, 32)}
    if name == "whisper":  # encoder, decoder and cross-attention
        cfg = T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                              max_source_positions=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1, attn_implementation=attn)
        return T.WhisperForConditionalGeneration(cfg), {"input_features": torch.randn(1, 16, 32),
                                                        "decoder_input_ids": ids(4)}
    raise ValueError(name)


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3", "falcon", "t5", "vit", "whisper"])
def test_every_attention_call_is_a_site_and_outputs_match(name, attn):
    model, inputs = _model(name, attn)
    model.eval()
    with torch.no_grad(), count_calls(model) as counts:
        ref = _main_output(model(**inputs))
    calls = counts["attention"] if attn == "sdpa" else counts["softmax"]
    assert calls > 0
    with torch.no_grad():
        out = _main_output(compiled(model)(**inputs))
    report = torchfx_eff.last_report()
    assert sites("graph") == [], report
    attention = matched("attention")
    assert len(attention) == calls, report
    assert all(s.op == ("sdpa" if attn == "sdpa" else "eager") for s in attention)
    assert len(matched("linear")) == counts["linear"], report
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gemma2_eager_softcap_is_matched_with_the_configs_cap_and_kept_on_cpu():
    """Gemma 2 spells the softcap as scores * scaling / cap -> tanh -> * cap, then + mask. Each call is one site
    holding the config's cap and scaling; SDPA cannot take a softcap, so on CPU the original is kept."""
    model, inputs = _model("gemma2", "eager")
    model.eval()
    cfg = model.config
    with torch.no_grad(), count_calls(model) as counts:
        ref = _main_output(model(**inputs))
    with torch.no_grad(), found_sites() as found:
        out = _main_output(compiled(model)(**inputs))
    assert counts["softmax"] == cfg.num_hidden_layers
    assert len(found) == counts["softmax"] and all(isinstance(s, torchfx_eff.passes.AttentionSite) for s in found)
    for s in found:
        assert s.op == "eager" and s.masked and s.kv_repeat == 2
        assert s.softcap == cfg.attn_logit_softcapping
        assert s.scale == pytest.approx(cfg.query_pre_attn_scalar ** -0.5, rel=1e-6)
    for r in matched("attention"):
        assert r.status == "kept", r.reason
        [sdpa] = [c for c in r.candidates if c.name == "sdpa_cpu"]
        assert not sdpa.applicable and "softcap" in sdpa.reason
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# model_type -> config overrides beyond TINY: MoE sizes, other names for the layer counts, vision sizes
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SEQ2SEQ = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=128, decoder_ffn_dim=128, d_model=64)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
ZOO = {
    "phi3": {}, "phi": {}, "gpt_neox": {}, "opt": {}, "bloom": {}, "stablelm": {}, "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8),
    "qwen3": {}, "olmo2": {}, "cohere": {}, "starcoder2": {}, "granite": {}, "gpt_bigcode": {}, "persimmon": {},
    "gemma": {}, "glm4": {}, "smollm3": {}, "ernie4_5": {}, "exaone4": {}, "cohere2": {}, "nemotron": {},
    "mamba": dict(state_size=8), "mixtral": MOE, "phimoe": MOE, "granitemoe": MOE,
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "llama4_text": {}, "bart": SEQ2SEQ, "pegasus": SEQ2SEQ, "m2m_100": SEQ2SEQ, "roberta": {}, "electra": {},
    "albert": {}, "distilbert": {}, "deberta-v2": {}, "clip_text_model": {}, "siglip_vision_model": dict(image_size=32, patch_size=8),
    "wav2vec2": {},
}


def _auto_model(model_type: str):
    """A tiny random-init model of model_type (its causal-LM head where it has one) and inputs for it, in fp32;
    SDPA attention where the model offers it, else eager."""
    import transformers as T

    cfg = T.AutoConfig.for_model(model_type, **{**TINY, **ZOO[model_type]})
    auto = next(a for a in (T.AutoModelForCausalLM, T.AutoModelForSeq2SeqLM, T.AutoModel) if type(cfg) in a._model_mapping)
    try:
        model = auto.from_config(cfg, attn_implementation="sdpa")
    except ValueError:  # "does not support an attention implementation through ... scaled_dot_product_attention"
        model = auto.from_config(cfg, attn_implementation="eager")
    ids = torch.randint(3, 100, (1, 8))
    name = type(model).__name__
    if "Vision" in name:
        return model.eval(), {"pixel_values": torch.randn(1, 3, 32, 32)}
    if "Wav2Vec2" in name:
        return model.eval(), {"input_values": torch.randn(1, 4000)}
    if cfg.is_encoder_decoder:
        return model.eval(), {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return model.eval(), {"input_ids": ids}


@pytest.mark.parametrize("model_type", ZOO)
def test_every_linear_layer_is_a_linear_site(model_type):
    """Every nn.Linear the model calls is matched as a linear site holding that very parameter (also where the
    module's weight is used directly: Mamba's dt_proj.weight @ x.transpose(1, 2)); every stack of MoE expert weights
    is an experts site; nn.MultiheadAttention's projections are linear sites; nothing is missed or falls back
    whole, and the outputs match."""
    torch.manual_seed(0)
    model, inputs = _auto_model(model_type)
    called = set()
    hooks = [m.register_forward_hook(lambda m, *_: called.add(m)) for m in linear_modules(model)]
    with torch.no_grad():
        ref = _main_output(model(**inputs))
    for h in hooks:
        h.remove()
    with torch.no_grad(), found_sites("linear") as found, found_sites("experts") as experts:
        out = _main_output(compiled(model)(**inputs))
    assert sites("graph") == [], torchfx_eff.last_report()
    site_weights = {id(s.weight) for s in found if isinstance(s, torchfx_eff.passes.LinearSite)}
    unmatched = [n for n, m in model.named_modules() if m in called and id(m.weight) not in site_weights]
    assert unmatched == [], torchfx_eff.last_report()
    # every stack of MoE expert weights is an experts site
    stacks = {id(p) for n, p in model.named_parameters() if p.dim() == 3 and "expert" in n}  # not conv kernels
    assert {id(s.weight) for s in experts if isinstance(s, torchfx_eff.passes.ExpertsSite)} == stacks
    assert sites("experts", "missed") == []
    # nn.MultiheadAttention (SigLIP's pooling head) is spelled as linears and SDPA (passes/mha.py): its packed
    # projection (or slices of it) and its output projection are linear sites too
    whole = {id(s.weight if s.weight._base is None else s.weight._base) for s in found
             if isinstance(s, torchfx_eff.passes.LinearSite)}
    mha = {id(p) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)
           for p in (m.in_proj_weight, m.out_proj.weight)}
    assert mha <= whole and sites("linear", "missed") == [], torchfx_eff.last_report()
    assert sqnr_ref(ref, out) >= 30.0


def test_bloom_alibi_attention_is_one_site_a_layer_holding_its_bias_and_mask():
    """BLOOM's eager attention: ALiBi added inside a baddbmm over (B·H, L, D), the scores viewed to (B, H, L, L) for
    the causal mask and the softmax (passes/heads.py respells it over [B, H, L, D])."""
    torch.manual_seed(0)
    model, inputs = _auto_model("bloom")
    with torch.no_grad(), count_calls(model) as counts:
        ref = _main_output(model(**inputs))
    with torch.no_grad(), found_sites() as found:
        out = _main_output(compiled(model)(**inputs))
    attention = [s for s in found if isinstance(s, torchfx_eff.passes.AttentionSite)]
    assert counts["softmax"] == model.config.n_layer and len(attention) == counts["softmax"], torchfx_eff.last_report()
    assert all(s.op == "eager" and len(s.mask) == 2 for s in attention)  # the ALiBi bias and the causal mask
    assert sites("attention", "missed") == []
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bloom_under_dynamic_shapes_takes_its_run_time_scale_on_q():
    """With dynamic=True Dynamo makes BLOOM's float scale (inv_norm_factor) a SymFloat: it moves onto q, and each
    layer's attention is still one site; the outputs match."""
    torch.manual_seed(0)
    model, inputs = _auto_model("bloom")
    c = torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config(inner="eager")), dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(_main_output(c(**inputs)), _main_output(model(**inputs)), rtol=1e-5, atol=1e-5)
    assert sites("attention", "missed") == [] and len(matched("attention")) == model.config.n_layer


def test_flex_attention_is_reported_missed_and_runs():
    """transformers' flex_attention: the higher-order op has no candidate; each call is one missed record, the
    compiled model matches eager (its mask building resumes in a graph of no inputs)."""
    torch.manual_seed(0)
    model, inputs = _model("mistral", "flex_attention")
    model.eval()
    with torch.no_grad():
        ref, out = _main_output(model(**inputs)), _main_output(compiled(model)(**inputs))
    missed = sites("attention", "missed")
    assert len(missed) == model.config.num_hidden_layers and all("flex_attention" in m.reason for m in missed)
    assert sites("graph") == []
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
