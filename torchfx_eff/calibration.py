"""Activation statistics for linear rewrites that fit their quantization to the inputs (w8a8_smooth, int4): per input
channel the max |x| and the mean x^2 that each linear's input reaches over calibration batches, a uniform sample
of its input rows and their X^T X (for int4's GPTQ), kept per weight parameter and per modality.

The model runs eagerly under a TorchFunctionMode that sees the same spellings the linear matcher takes
(F.linear, addmm as in GPT-2's Conv1D, matmul against a parameter), so no model needs code of its own, and a
rewrite finds a site's statistics by its weight parameter.

Per-modality statistics (MASQuant's observation: text and image tokens load different channels) are stored and
reported, but a compiled graph does not know which modality its input is, so smoothing uses their union (the
channel-wise max over modalities), which is sound for every modality, if not tuned to each.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary
from tqdm import tqdm

UNLABELLED = "unlabelled"
# spelling -> (position and keyword of x, of the weight, weight layout), as in passes/linear.py
_SPELLINGS = {
    torch.nn.functional.linear: ((0, "input"), (1, "weight"), "nk"),
    torch.addmm: ((1, "mat1"), (2, "mat2"), "kn"),
    torch.matmul: ((0, "input"), (1, "other"), "kn"),
    torch.Tensor.matmul: ((0, "self"), (1, "other"), "kn"),  # x @ w
}


SAMPLE_ROWS = 128  # input rows kept per weight and modality: enough to rank a few packings by their error
MIN_EXAMPLE_ROWS = 16  # fewer rows than this in a compile's example input make no statistics (see site_activations)
# Largest K whose X^T X is kept: a K x K fp32 sum is 256 MB there. Past it (an 8B Llama's down_proj, K = 14336:
# 820 MB a layer, 26 GB over 32) it would outweigh the model, and int4 quantizes without GPTQ.
MAX_HESSIAN_K = 8192


@dataclass
class _Gram:
    """X^T X over the rows of one input, shared by the weights that read it (Q/K/V, gate/up): one K x K sum per
    input, not per weight."""

    sum: torch.Tensor  # fp32 [K, K] on x's device
    rows: int
    modality: str
    last: weakref.ref | None = None  # the input last added: siblings that read the same tensor add nothing

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        if self.last is not None and self.last() is x:
            return
        r = rows.float()
        self.sum.addmm_(r.T, r)
        self.rows += r.shape[0]
        self.last = weakref.ref(x)


@dataclass
class _Channels:
    absmax: torch.Tensor  # fp32 [K]
    square_sum: torch.Tensor  # fp64 [K]
    rows: int
    sample: torch.Tensor  # [<= SAMPLE_ROWS, K] in x's dtype: the rows with the smallest keys, a uniform sample
    keys: torch.Tensor
    gram: _Gram | None  # None when K > MAX_HESSIAN_K


class ActivationStats:
    """weight parameter -> {modality: its input's statistics}, for as long as the parameter lives."""

    def __init__(self):
        self._by_weight = WeakIdKeyDictionary()
        self._keys = torch.Generator().manual_seed(0)  # sampling keys: the same calls sample the same rows
        self._last_gram: _Gram | None = None  # the sum the previous record added to, for a sibling to share
        self.generation = 0  # bumped by each calibration run: weights packed from older statistics are stale

    def record(self, weight: torch.Tensor, x: torch.Tensor, modality: str) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        keys = torch.rand(rows.shape[0], generator=self._keys)
        keys, keep = keys.topk(min(SAMPLE_ROWS, len(keys)), largest=False)  # the only rows that can be sampled
        per_modality = self._by_weight.setdefault(weight, {})
        seen = per_modality.get(modality)
        gram = None if seen is None else seen.gram
        if gram is None and rows.shape[1] <= MAX_HESSIAN_K:
            last = self._last_gram
            sibling = last is not None and last.modality == modality and last.last is not None and last.last() is x
            gram = last if sibling else _Gram(rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float32), 0,
                                              modality)
        if gram is not None:
            gram.add(x, rows)
            self._last_gram = gram
        new = _Channels(rows.abs().amax(dim=0).float().cpu(), rows.double().square().sum(dim=0).cpu(), rows.shape[0],
                        rows[keep.to(rows.device)].cpu(), keys, gram)
        if seen is not None:
            new = _Channels(torch.maximum(seen.absmax, new.absmax), seen.square_sum + new.square_sum,
                            seen.rows + new.rows, torch.cat([seen.sample, new.sample]),
                            torch.cat([seen.keys, new.keys]), gram)
        if new.keys.numel() > SAMPLE_ROWS:
            keep = new.keys.topk(SAMPLE_ROWS, largest=False).indices
            new.sample, new.keys = new.sample[keep], new.keys[keep]
        per_modality[modality] = new

    def by_modality(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """max |x| per channel, per modality."""
        return {m: c.absmax for m, c in self._by_weight.get(weight, {}).items()}

    def _channels(self, weight: torch.Tensor) -> list[_Channels]:
        """The weight's statistics, one per modality. A fused siblings' concatenation (Q/K/V, gate/up) has its
        first calibrated member's: they all read the same input."""
        sources = [weight] if weight in self._by_weight else [t for t in _copied_from(weight) if t in self._by_weight]
        return list(self._by_weight[sources[0]].values()) if sources else []

    def absmax(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The union over modalities (channel-wise max), or None if the weight was never calibrated."""
        stats = self._channels(weight)
        return torch.stack([c.absmax for c in stats]).amax(dim=0) if stats else None

    def mean_square(self, weight: torch.Tensor) -> torch.Tensor | None:
        """fp32 [K] mean x^2 over every calibrated row, or None."""
        stats = self._channels(weight)
        return (sum(c.square_sum for c in stats) / sum(c.rows for c in stats)).float() if stats else None

    def hessian(self, weight: torch.Tensor) -> torch.Tensor | None:
        """fp32 [K, K] X^T X / rows over every calibrated row (on the weight's device), or None (uncalibrated, or K
        above MAX_HESSIAN_K)."""
        grams = [c.gram for c in self._channels(weight)]
        if not grams or None in grams:
            return None
        return sum(g.sum for g in grams) / sum(g.rows for g in grams)

    def sample(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Sampled input rows [R, K] of every modality, or None."""
        stats = self._channels(weight)
        return torch.cat([c.sample for c in stats]) if stats else None

    def clear(self) -> None:
        self._by_weight = WeakIdKeyDictionary()
        self._last_gram = None
        self._keys = torch.Generator().manual_seed(0)
        self.generation += 1


ACTIVATION_STATS = ActivationStats()


def _copied_from(weight: torch.Tensor) -> list[torch.Tensor]:
    """The parameters that passes/siblings.py concatenated into `weight`, if it is such a copy (read from that
    pass's cache of copies: it keeps each copy with weak references to its members)."""
    from .passes import siblings

    for entries in list(getattr(siblings, "_COPIES", {}).values()):
        for refs, _, copy in entries.values():
            if copy is weight:
                return [t for t in (ref() for ref in refs) if t is not None]
    return []


@dataclass
class Activations:
    """What a rewrite knows of a linear site's input x: per input channel max |x| and mean x^2, sample rows, and
    X^T X / rows when calibration kept it."""

    absmax: torch.Tensor
    mean_square: torch.Tensor
    sample: torch.Tensor
    source: str  # "calibrated<generation>" or "example": packings from different sources differ
    hessian: torch.Tensor | None


def site_activations(site) -> Activations | None:
    """Calibration if the site's weight has it, else the site's example input if it has MIN_EXAMPLE_ROWS rows, else
    None. Statistics fitted to a few tokens can misfit the others badly (one decode token's smoothing factors: 21 dB
    where plain per-token int8 gives 37, on an MLP's second linear; 16 tokens: 35 dB), and the gate, which runs on
    that same example, cannot see it. For the same reason an example builds no X^T X: GPTQ fits the weights to
    exactly those rows (with fewer than K of them, H is singular but for the dampening), and the gate would
    then measure the fit on its own training set."""
    w = site.weight
    absmax = ACTIVATION_STATS.absmax(w)
    if absmax is not None:
        return Activations(absmax, ACTIVATION_STATS.mean_square(w), ACTIVATION_STATS.sample(w),
                           f"calibrated{ACTIVATION_STATS.generation}", ACTIVATION_STATS.hessian(w))
    x = site.x if isinstance(site.x, torch.Tensor) else site.inputs.get(site.x)  # a real tensor stands for itself
    if x is None:
        raise ValueError("no activation statistics for this weight: run torchfx_eff.calibrate_activations(model, "
                         "batches), or compile through the backend, which captures the example input")
    rows = x.detach().reshape(-1, x.shape[-1])
    if rows.shape[0] < MIN_EXAMPLE_ROWS:
        return None
    sample = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:SAMPLE_ROWS].to(rows.device)]
    return Activations(rows.abs().amax(dim=0).float(), rows.float().square().mean(dim=0), sample, "example", None)


def _linear_operands(func, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(x, weight, K) when func is a linear spelling whose weight is a 2-D floating parameter."""
    spelling = _SPELLINGS.get(func)
    if spelling is None:
        return None
    (ix, kx), (iw, kw), layout = spelling
    x = args[ix] if len(args) > ix else kwargs.get(kx)
    w = args[iw] if len(args) > iw else kwargs.get(kw)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 2 or not w.is_floating_point():
        return None
    K = w.shape[1] if layout == "nk" else w.shape[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != K or not x.is_floating_point():
        return None
    return x, w, K


class _RecordLinearInputs(TorchFunctionMode):
    def __init__(self, stats: ActivationStats, weights: set[int], modality: str):
        super().__init__()
        self.stats, self.weights, self.modality = stats, weights, modality

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _linear_operands(func, args, kwargs)
        if operands is not None and id(operands[1]) in self.weights:
            self.stats.record(operands[1], operands[0], self.modality)
        return func(*args, **kwargs)


@dataclass
class LinearActivations:
    """One calibrated linear: its weight's name, K, and max |x| per channel for each modality."""

    name: str
    K: int
    by_modality: dict[str, torch.Tensor]

    def summary(self) -> str:
        union = torch.stack(list(self.by_modality.values())).amax(dim=0).clamp(min=1e-30)
        parts = []
        for modality, absmax in self.by_modality.items():
            outlier = float(absmax.max() / absmax.median().clamp(min=1e-30))
            # how much quieter this modality's typical channel is than the union that smoothing uses
            coverage = float((absmax / union).median())
            parts.append(f"{modality}: max|x|={float(absmax.max()):.3g} max/median={outlier:.1f} median share of union={coverage:.2f}")
        return f"{self.name} (K={self.K}): " + "; ".join(parts)


@dataclass
class CalibrationReport:
    linears: list[LinearActivations]
    batches: int

    def __str__(self) -> str:
        head = f"activation statistics of {len(self.linears)} linears ({self.batches} batches in this call; they add up over calls)"
        return "\n".join([head] + ["  " + lin.summary() for lin in self.linears])


def _call(model, batch):
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def calibrate_activations(model: torch.nn.Module, batches: Iterable, modality: str | Callable | None = None,
                          progress: bool = True) -> CalibrationReport:
    """Run `model` eagerly over `batches` (each a tensor, a tuple of positional arguments or a dict of keyword
    arguments) and record, for every linear whose weight is a 2-D floating parameter of the model, the max |x| of
    each input channel. Statistics add up over calls; a backend compiled afterwards smooths with them.

    modality: None (unlabelled), a label for every batch of this call, or a function batch -> label. Statistics
    are kept per label; smoothing uses their union.
    """
    if modality is not None and not isinstance(modality, str) and not callable(modality):
        raise ValueError(f"modality={modality!r} is not allowed; use None, a label string or a function batch -> label")
    weights = {id(p): name for name, p in model.named_parameters() if p.dim() == 2 and p.is_floating_point()}
    ids, count = set(weights), 0
    for batch in tqdm(batches, desc="calibrating activations", disable=not progress):
        label = modality(batch) if callable(modality) else modality or UNLABELLED
        if not isinstance(label, str):
            raise ValueError(f"modality(batch) returned {label!r}; it must return a label string")
        with _RecordLinearInputs(ACTIVATION_STATS, ids, label):
            _call(model, batch)
        count += 1
    ACTIVATION_STATS.generation += 1
    linears = [LinearActivations(weights[id(p)], int(next(iter(s.values())).numel()), s)
               for p in model.parameters() if id(p) in weights and (s := ACTIVATION_STATS.by_modality(p))]
    return CalibrationReport(linears, count)
