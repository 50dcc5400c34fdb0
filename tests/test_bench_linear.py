"""The gpu_linear bench's read ceiling (bench/linear.py read_ms): its kernel reads every word once; the offline
instruction counts of bench/sass.py."""
import importlib
import json
import os
import subprocess
import sys
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


def test_offline_sass_counts_a_multiply_add_for_every_weight_of_the_gemv_loops():
    """bench/sass.py finds the GEMVs' main loops in their sm90 SASS (offline, Triton's bundled ptxas): a loop pass
    holds at least one FFMA for each weight a thread multiplies, and a few instructions a weight in all (a wrong
    loop, or a compile without the JIT's specializations, would fail one bound)."""
    code = ("import sys, json, triton; sys.path.insert(0, 'bench'); import sass; "
            "rows = [r for bits in (4, 8) for r in sass.gemv_rows(bits, False, [triton.Config("
            "{'BLOCK_N': 8, 'STEP_BYTES': 1024}, num_warps=4)])]; print(json.dumps(rows))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCH.parent, env=env, capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out.splitlines()[-1])
    assert [r["bits"] for r in rows] == [4, 8]
    for row in rows:
        assert row["ffma"] >= row["weights_per_pass"], row
        assert 2.5 <= row["instructions_per_weight"] <= 12, row
