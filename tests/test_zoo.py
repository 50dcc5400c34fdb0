"""More architectures, eager and SDPA attention: every attention call is one matched site, outputs match.

(Llama, Qwen2, GPT-2 and BERT are in test_backend.py.) Tiny random-init configs, no downloads.
"""
import pytest
import torch
import transformers as T
from helpers import compiled, count_calls, found_sites, matched, sites

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
