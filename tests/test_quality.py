"""The perplexity measure of the quality bench, on tiny random models; the fixture text when its package is there."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import SMALL, VOCAB, make_model

from torchfx_eff.text import perplexity, prose


def _reference(model, ids: torch.Tensor, window: int) -> float:
    """Whole windows in one forward each (no cache), log-softmax in fp64."""
    nll = []
    with torch.no_grad():
        for w in ids[: len(ids) // window * window].view(-1, window):
            logp = model(input_ids=w[None]).logits[0, :-1].double().log_softmax(-1)
            nll.append(-logp.gather(-1, w[1:, None])[:, 0])
    return math.exp(torch.cat(nll).mean().item())


def test_uniform_logits_give_the_vocab_size():
    model = make_model("llama", SMALL).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: each token has probability 1 / VOCAB
    ppl, n = perplexity(model, model.config, torch.randint(0, VOCAB, (40,)), window=16)
    assert ppl == pytest.approx(VOCAB, rel=1e-6)
    assert n == 2 * 15  # two whole windows, the first token of each unpredicted; the 8-token tail left out


def test_matches_a_direct_fp64_computation():
    model = make_model("llama", SMALL).eval()
    ids = torch.randint(0, VOCAB, (50,))
    ppl, n = perplexity(model, model.config, ids, window=24)
    assert n == 2 * 23
    assert ppl == pytest.approx(_reference(model, ids, 24), rel=1e-5)
    assert 1 < ppl < 10 * VOCAB  # a random model is close to uniform, not degenerate


@pytest.mark.parametrize("window", [1, 51, 8.0])
def test_bad_window_is_refused(window):
    model = make_model("llama", SMALL).eval()
    with pytest.raises(ValueError, match="window="):
        perplexity(model, model.config, torch.zeros(50, dtype=torch.long), window=window)


def test_ids_must_be_1d():
    model = make_model("llama", SMALL).eval()
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, model.config, torch.zeros(1, 50, dtype=torch.long), window=16)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="the fixture's package (gensim) is not installed")
def test_prose_is_the_pinned_lee_corpus():
    text = prose()
    assert text.startswith("Hundreds of people have been forced to vacate their homes")
    assert text.count("\n\n") == 299  # 300 articles


def _bench_quality():
    path = Path(__file__).parent.parent / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("calibrate", [0, 1, 3])
def test_bench_calibration_windows_follow_the_measured_ones(calibrate):
    tokens = torch.arange(100)
    ids, calibration = _bench_quality().split(tokens, calibrate, window=10, windows=4)
    assert ids.tolist() == list(range(40))
    assert calibration.shape == (calibrate, 10)
    assert calibration.flatten().tolist() == list(range(40, 40 + 10 * calibrate))
    assert not set(ids.tolist()) & set(calibration.flatten().tolist())


@pytest.mark.parametrize("length,calibrate", [(100, 7), (65, 3), (30, 0), (100, -1)])
def test_bench_refuses_more_calibration_than_the_text_holds(length, calibrate):
    with pytest.raises(ValueError, match="--calibrate"):
        _bench_quality().split(torch.arange(length), calibrate, window=10, windows=4)
