"""Benchmark entry point: one suite per call, JSON results beside their anchors, a short table last.

    python bench/run.py --suite cpu_decode            # writes bench/results/cpu_decode-<device>-<date>.json
    python bench/run.py --suite gpu_attention         # on a GPU: kernels, per-site choice, decode, 1.1B prefill
    python bench/run.py --suite gpu_linear            # on a GPU: linear kernels vs cuBLAS/ATen, 1.1B decode
    python bench/run.py --suite cpu_quality           # SmolLM2 perplexity on a text fixture, bf16 vs each linear mode
    python bench/run.py --suite cpu_graph_budget      # SmolLM2: perplexity kept by the graph check at each budget
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from torchfx_eff.config import ACCURACY

RESULTS = Path(__file__).parent / "results"
# each GPU suite's parts; --parts picks some (a subset names its file)
PARTS = {"gpu_attention": "kernels,decode,e2e", "gpu_linear": "kernels,chain,e2e"}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def commit() -> str:
    """HEAD (dirty if measured code differs); BENCH_COMMIT when set (the device's copy of the tree has no history)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                               capture_output=True, text=True).stdout  # results files are not measured code
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from torchfx_eff.cost.devices import cpu_model

    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_decode(args) -> list[dict]:
    """SmolLM2-135M bf16 greedy decode tokens/s: eager, Inductor, torchfx_eff (int8 weight-only), same run."""
    from torchfx_eff.demo import PROMPT, common_prefix, compare
    from torchfx_eff.models import chat_prompt, load_smollm2

    model, tok = load_smollm2(torch.bfloat16)
    results = compare(model, chat_prompt(tok, PROMPT), args.tokens, repeats=args.repeats)
    eager, inductor = results["eager"], results["inductor"]
    rows = []
    for name in ("eager", "inductor", "torchfx_eff"):
        r = results[name]
        rows.append({"name": f"decode tok/s, {name}", "value": r["tok_per_s"], "unit": "tok/s",
                     "anchor": "inductor", "anchor_value": inductor["tok_per_s"],
                     "ratio": r["tok_per_s"] / inductor["tok_per_s"], "compile_s": r["compile_s"],
                     "common_prefix_with_eager": common_prefix(r["tokens"], eager["tokens"]),
                     "common_prefix_with_inductor": common_prefix(r["tokens"], inductor["tokens"]),
                     "tokens": len(r["tokens"])})
    rows[-1]["target_ratio"] = 1.5
    summary = results["report"].summary()
    before, after = results["report"].weight_bytes()
    rows.append({"name": "rewrite summary", "value": summary, "weight_bytes": [before, after]})
    return rows


# suite -> a function of the parsed args, or the bench module whose function of that name it is (imported
# only when run: GPU suites need a GPU)
SUITES = {"cpu_decode": cpu_decode, "cpu_quality": "quality", "cpu_graph_budget": "quality", "gpu_attention": "attention", "gpu_linear": "linear"}


def run_suite(name: str, args) -> list[dict]:
    suite = SUITES[name]
    return suite(args) if callable(suite) else getattr(importlib.import_module(suite), name)(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=tuple(SUITES), default="cpu_decode")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default=None,
                        help="gpu_attention: kernels, decode, e2e; gpu_linear: kernels, chain, e2e, tuner, crossover, experts; or several "
                             "(default: all but tuner; a subset names its file)")
    parser.add_argument("--modes", default="",
                        help="cpu_quality, cpu_graph_budget, gpu_linear: comma-separated linear modes (default: all; a subset names its "
                             "file); gpu_linear e2e also takes a mode+siblings (Q/K/V and gate/up fused, originals "
                             "released)")
    parser.add_argument("--rows", default="",
                        help="gpu_linear kernels: comma-separated row counts M (default: 1,16,128,4096; a subset "
                             "names its file)")
    parser.add_argument("--calibrate", type=int, default=64,
                        help="cpu_quality: held-out windows of 512 tokens to calibrate activations on (0: none; "
                             "8 until 2026-12-06, see bench/quality.py)")
    parser.add_argument("--accuracy", choices=ACCURACY, default=None,
                        help="cpu_quality: every mode at this per-site budget (default: the mode's own tier)")
    parser.add_argument("--dither", action="store_true",
                        help="cpu_quality: move SmolLM2's linears off their 4-bit grid first (native-like weights)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.parts = args.parts or PARTS.get(args.suite, "")

    code = commit()  # before the suite runs: the code that is measured
    rows = run_suite(args.suite, args)
    result = {"suite": args.suite, "device": device(), "versions": versions(), "commit": code,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].split(" (")[0].lower()).strip("-")
    parts = "" if args.parts == PARTS.get(args.suite, "") else "-" + args.parts.replace(",", "-")
    parts += "-m" + args.rows.replace(",", "-") if args.rows else ""
    parts += "-" + "".join(c if c.isalnum() or c == "_" else "-" for c in args.modes) if args.modes else ""
    path = args.out / f"{args.suite}{parts}-{slug}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=1))

    print(f"\n{args.suite} on {result['device']}, commit {result['commit'][:12]} -> {path}")
    print(f"{'figure (anchored)':<44} {'value':>10} {'anchor':>10} {'ratio':>7} {'target':>7}")
    for r in rows:
        if isinstance(r.get("value"), (int, float)) and r.get("anchor_value") is not None:
            ratio = r.get("ratio", r["value"] / r["anchor_value"])
            target = r.get("target_ratio", r.get("target"))
            print(f"{r['name']:<44} {r['value']:>10.4g} {r['anchor_value']:>10.4g} {ratio:>7.3f}x "
                  f"{'' if target is None else f'{target:.3g}':>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
