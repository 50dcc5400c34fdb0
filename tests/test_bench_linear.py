"""The gpu_linear bench's read ceiling (bench/linear.py read_ms): its kernel reads every word once."""
import importlib
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).parent.parent / "bench"


def test_read_ceiling_kernel_reads_every_word_once(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # bench/linear.py imports its neighbour models.py
    linear = importlib.import_module("linear")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for block, steps, warps in linear.READ_CONFIGS:
        chunk = block * steps
        n = 2 * chunk + 5  # the last program's chunk is mostly past the end
        words = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int32)
        programs = -(-n // chunk)
        out = torch.zeros(programs, dtype=torch.int32, device=device)
        linear._stream_read[(programs,)](words.to(device), out, n, CHUNK=chunk, BLOCK=block, num_warps=warps)
        expected = [np.bitwise_xor.reduce(words[i * chunk:(i + 1) * chunk].numpy()) for i in range(programs)]
        assert out.cpu().tolist() == expected, (block, steps, warps)
