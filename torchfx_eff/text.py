"""A text fixture of natural English prose, and the perplexity of a causal LM on it, measured as decoding runs.

The fixture is the background set of the Lee corpus: 300 short news articles (Australian Broadcasting Corporation
news mail service), one per line, ~360 kB, ~75k SmolLM2 tokens. It was collected for Lee, Pincombe & Welsh (2005),
"An empirical evaluation of models of text document similarity" (CogSci 2005), and ships as test data in the
gensim wheel (LGPL-2.1): gensim/test/test_data/lee_background.cor. Pinned: gensim==4.4.0 (constraints.txt, extra
`bench`), and the file's SHA-256 is checked, so a figure always refers to the same text.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import torch

LEE_BACKGROUND = "test/test_data/lee_background.cor"
LEE_BACKGROUND_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
INSTALL = "pip install -c constraints.txt '.[bench]' (or just the file: pip install --no-deps gensim==4.4.0)"


def lee_background_path() -> Path:
    # find_spec, not import: gensim's __init__ needs scipy, which --no-deps leaves out; we only read a file
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise RuntimeError(f"the text fixture ships in gensim, which is not installed: {INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / LEE_BACKGROUND
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (a gensim without its test data?): {INSTALL}")
    return path


def prose() -> str:
    """The Lee background articles, in file order, separated by blank lines."""
    data = lee_background_path().read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != LEE_BACKGROUND_SHA256:
        raise RuntimeError(f"{lee_background_path()} has SHA-256 {digest}, not the pinned {LEE_BACKGROUND_SHA256}: "
                           f"{INSTALL}")
    return "\n\n".join(line.strip() for line in data.decode("ascii").splitlines() if line.strip())


@torch.no_grad()
def window_nll(forward, config, window: torch.Tensor) -> torch.Tensor:
    """fp64 negative log-likelihood of each token of `window` (1-D ids) but the first, given the ones before it.

    Teacher-forced decoding: the tokens go in one at a time through a static KV cache, so `forward` (a HF causal
    LM, maybe compiled) runs its decode graph, the one a compiled model generates with.
    """
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=len(window))
    nll = []
    for i in range(len(window) - 1):
        logits = forward(input_ids=window[None, i:i + 1], past_key_values=cache,
                         cache_position=torch.tensor([i], device=window.device), logits_to_keep=1).logits
        nll.append(-logits[0, -1].float().log_softmax(-1)[window[i + 1]])
    return torch.stack(nll).double()


def perplexity(forward, config, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """(exp of the mean NLL, tokens predicted) over the consecutive, non-overlapping windows of `window` tokens
    that fit in `ids` (1-D); each window starts from an empty cache, a tail shorter than a window is left out."""
    if ids.dim() != 1:
        raise ValueError(f"ids has shape {tuple(ids.shape)}; pass a 1-D tensor of token ids")
    if not isinstance(window, int) or not 2 <= window <= len(ids):
        raise ValueError(f"window={window!r} is not allowed; use an int from 2 to len(ids)={len(ids)}")
    windows = ids[: len(ids) // window * window].view(-1, window)
    nll = torch.cat([window_nll(forward, config, w) for w in windows])
    return math.exp(nll.mean().item()), len(nll)
