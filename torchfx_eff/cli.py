"""torchfx-eff demo | report FILE.jsonl | explain PATH"""
from __future__ import annotations

import argparse
import sys


def _explain(path: str, seq_len: int, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    import torchfx_eff

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    is_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    model = (AutoModelForCausalLM if is_lm else AutoModel).from_pretrained(
        path, dtype=getattr(torch, dtype), local_files_only=True).eval()
    vocab = getattr(config.get_text_config(), "vocab_size", 1000)
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    torchfx_eff.reset()
    with torch.no_grad():
        torch.compile(model, backend=torchfx_eff.backend(torchfx_eff.Config.from_env(inner="eager")))(input_ids=ids)
    print(torchfx_eff.last_report())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchfx-eff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="greedy decoding of SmolLM2-135M: eager vs Inductor vs torchfx_eff")
    demo.add_argument("--tokens", type=int, default=48)
    rep = sub.add_parser("report", help="print the table of a JSONL rewrite log (Config.log / TORCHFX_EFF_LOG)")
    rep.add_argument("file")
    exp = sub.add_parser("explain", help="compile a saved HF model directory on example inputs and print the report")
    exp.add_argument("path")
    exp.add_argument("--seq-len", type=int, default=16)
    exp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.tokens)
    elif args.command == "report":
        from .report import Report

        print(Report.from_jsonl(args.file))
    else:
        _explain(args.path, args.seq_len, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
