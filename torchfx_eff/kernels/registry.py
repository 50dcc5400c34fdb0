"""Implementations register here, next to their kernels; the pipeline asks by site kind."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from .. import codegen
from ..config import ACCURACY
from ..passes.linear import is_output_linear


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


COLD_COPIES_MAX = 256  # copies of a kernel's inputs while it is timed (tiny kernels are launch-bound anyway)


def cold_copies(args: tuple, l2_bytes: int) -> list[tuple]:
    """args, then copies of its tensors (other values shared), enough that all together hold four times l2_bytes:
    calls cycling over them meet their inputs in HBM, as each layer of a decode step meets its own weights."""
    nbytes = sum(a.nbytes for a in args if isinstance(a, torch.Tensor))
    copies = min(COLD_COPIES_MAX, -(-4 * l2_bytes // max(nbytes, 1)))
    return [args] + [tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) for _ in range(copies - 1)]


def decode_bench(calls: Sequence[Callable[[], Any]], quantiles, launches: int = 16, reps: int = 9) -> list[float]:
    """ms of one call at the given quantiles over reps, timed as a decode step meets its kernels: launched back to
    back from one CUDA graph (a programmatic launch overlaps the previous kernel's tail, as in a step), cycling over
    calls until at least `launches` ran. Calls over cold_copies read their inputs from HBM."""
    count = max(launches, len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the calls' inputs are written there
    with torch.cuda.stream(stream):
        calls[0]()  # compiles (and fails, for a config out of resources) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(count):
                calls[i % len(calls)]()
        graph.replay()  # warm-up
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) / count for start, end in events])
    return torch.quantile(times, torch.tensor(quantiles, dtype=times.dtype)).tolist()


class DecodeTimedAutotuner(triton.runtime.Autotuner):
    """triton.autotune timing each config by decode_bench over cold_copies of the kernel's arguments. Triton's own
    bench times single launches after a 256 MB write; an L2 flush before each launch (this module's bench until
    2026-12-07) also timed launches alone: on the H100 its picks for M = 1 GEMVs ran up to 9% slower back to back than
    the best config (bench/results/gpu_linear-tuner-...-2026-12-07), and a second tune picked a config 1.75x off."""

    def _bench(self, *args, config, **meta):
        options = dict(meta, **config.all_kwargs())
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        copies = cold_copies(args, torch.cuda.get_device_properties(device).L2_cache_size)
        try:
            return decode_bench([functools.partial(self.fn.run, *copy, **options) for copy in copies],
                                quantiles=(0.5, 0.2, 0.8))
        except (OutOfResources, PTXASError, CompileTimeAssertionFailure):
            return [float("inf")] * 3


def autotuned(kernel, configs, key, prune=None):
    """kernel under DecodeTimedAutotuner; the kernel itself under Triton's interpreter (callers then pass a config's
    values)."""
    if triton.knobs.runtime.interpret:
        return kernel
    return DecodeTimedAutotuner(kernel, kernel.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                                prune_configs_by=prune and {"early_config_prune": prune})


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for kernels that size their grids to the GPU; elsewhere (Triton's
    interpreter) 4, a small GPU, so that small test shapes take the same split paths."""
    return _cuda_sm_count(device.index or 0) if device.type == "cuda" else 4


@dataclass
class Replacement:
    """One call that computes a site's value: op(*args, **kwargs). op is a registered custom op (opaque to
    Inductor) or a function of ATen ops that Inductor traces into.

    args may hold graph nodes (site inputs), tensors (constants packed at compile time, baked into the
    graph as buffers) and plain Python values.
    """

    op: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    weight_bytes: tuple[int, int] | None = None  # (before, after) when weights are repacked
    sources: dict[str, torch.Tensor] = field(default_factory=dict)  # parameters the packed constants come from


@dataclass(frozen=True)
class Implementation:
    name: str
    kind: str  # the site kind it replaces
    applicable: Callable[[Any, Any], str | None]  # (site, device spec) -> None, or why not
    cost: Callable[[Any, Any], sympy.Expr]  # (site, device spec) -> seconds
    replace: Callable[[Any], Replacement] | None  # None: the original computation, left as is
    accuracy: str = "lossless"  # the strictest Config.accuracy under which it may be chosen
    # (site) -> where its kernel applies the site's epilogue (replace() then computes the epilogue's value): True,
    # False, or a sympy condition over the site's sizes (e.g. M < 64: above, a pass of its own applies it)
    fuses: Callable[[Any], Any] | None = None
    # bits a stored weight takes (int4: 4, ternary: 2); None where weights keep a float dtype (2:4 keeps half of them)
    weight_bits: int | None = None

    def epilogue_fused_when(self, site) -> sympy.Basic:
        fused = getattr(site, "epilogue", None) is not None and self.fuses is not None and self.fuses(site)
        return sympy.sympify(fused)

    def fuses_epilogue(self, site) -> bool:
        """Whether to ask replace() for the epilogue: its kernel applies it at some size."""
        return self.epilogue_fused_when(site) != sympy.false

    def __post_init__(self):
        if self.accuracy not in ACCURACY:
            raise ValueError(f"Implementation.accuracy={self.accuracy!r}; choose one of {ACCURACY}")


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_PACKED = WeakIdKeyDictionary()  # parameter -> {packing name: (parameter version, packed)}


def pack_once(weight: torch.Tensor, packing: str, pack: Callable[[], Any]):
    """pack(), computed once per parameter version and packing and shared by every graph that uses it
    (a prefill and a decode graph hold one copy of the LM head, not two)."""
    entry = _PACKED.setdefault(weight, {})
    hit = entry.get(packing)
    if hit is None or hit[0] != weight._version:
        entry[packing] = hit = (weight._version, pack())
    return hit[1]


def pack_fused(site, packing: str, pack: Callable[[], tuple], channel_tensors: int | None = None):
    """(packed tensors, bias argument, epilogue arguments (spec, operand, dtype)) of a Triton replacement that applies
    site.epilogue (none: no epilogue arguments). An epilogue that pairs gate and up channels (a sibling-fused gate/up)
    reads them interleaved: the first channel_tensors packed tensors (all by default), whose first dimension is the
    channels, and the bias (a constant then) are packed so."""
    epilogue = site.epilogue
    extra = () if epilogue is None else (epilogue.spec, epilogue.operand, epilogue.dtype)
    if epilogue is None or not epilogue.pairs:
        return pack_once(site.weight, packing, pack), site.bias, extra

    def paired():
        packed = pack()
        n = len(packed) if channel_tensors is None else channel_tensors
        return tuple(codegen.pair_channels(t) if i < n else t for i, t in enumerate(packed))

    bias = None if site.bias is None else codegen.pair_channels(site.bias_param)
    return pack_once(site.weight, f"{packing}_paired", paired), bias, extra


def register(impl: Implementation) -> Implementation:
    family = _REGISTRY.setdefault(impl.kind, {})
    if impl.name in family:
        raise ValueError(f"{impl.kind} implementation {impl.name!r} is registered twice")
    family[impl.name] = impl
    return impl


def implementations(kind: str) -> list[Implementation]:
    return list(_REGISTRY.get(kind, {}).values())


def names(kind: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(kind, {}))


OUTPUT_LINEAR_BITS = 8
OUTPUT_LINEAR_REASON = (f"the graph's output linear keeps >= {OUTPUT_LINEAR_BITS}-bit weights (GPTQ/AWQ/llama.cpp keep the LM "
                        "head at high precision; Config.output_linear_8bit=False quantizes it too)")


def keeps_output_linear(impl: Implementation, site) -> str | None:
    """Guard: a candidate of fewer than 8 bits a weight refuses the graph's output linear (an LM head, found
    structurally by passes.linear.is_output_linear), whose error every logit carries and no later layer averages."""
    if site.kind != "linear" or impl.weight_bits is None or impl.weight_bits >= OUTPUT_LINEAR_BITS:
        return None
    return OUTPUT_LINEAR_REASON if is_output_linear(site) else None


def needs_device(site, device_type: str) -> str | None:
    return None if site.device.type == device_type else f"needs a {device_type} tensor, site is on {site.device.type}"


def needs_dtype(site, dtypes: tuple[torch.dtype, ...]) -> str | None:
    if site.dtype in dtypes:
        return None
    return f"dtype {site.dtype} not supported (needs one of {', '.join(str(d) for d in dtypes)})"
