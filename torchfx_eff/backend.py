"""The torch.compile entry point: normalize -> match -> candidates -> cost -> gate -> rewrite -> graph check -> inner
compile."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
import torch.fx as fx

from . import cost, gate, kernels, memory, passes, report
from .config import FAMILIES, Config
from .report import SiteRecord
from .passes.siblings import copies_read_as_is, separately
from .rewrite import Rewriter, rows_dispatch

log = logging.getLogger("torchfx_eff")


class StageError(RuntimeError):
    def __init__(self, stage: str, error: Exception):
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {first_line}")
        self.stage = stage


@contextlib.contextmanager
def stage(name: str):
    try:
        yield
    except StageError:
        raise
    except Exception as e:
        raise StageError(name, e) from e


def _record(graph_id, site, status, reason="", cands=(), **kw) -> SiteRecord:
    return SiteRecord(
        graph_id=graph_id, kind=site.kind, status=status, op=site.op, location=site.location, reason=reason,
        candidates=[rec for _, rec in cands],
        dims={k: str(v) for k, v in site.dims.items()}, hints={k: site.size(k) for k in site.dims},
        site_id=_site_id(site), **kw,
    )


def _site_id(site) -> str:
    """What names a site across rewrites of its graph: a linear's weight (a fused one's concatenation), else its node."""
    return getattr(site, "weight_name", None) or site.node.name


def _missed(graph_id, miss: passes.Miss) -> SiteRecord:
    return SiteRecord(graph_id, miss.kind, "missed", miss.op, miss.location, reason=miss.reason)


def _epilogue(site):
    """The site's epilogue (only linear sites have one)."""
    return getattr(site, "epilogue", None)


def _unfused(site):
    """The site without its epilogue: what replace() computes for a candidate that does not apply it."""
    return dataclasses.replace(site, epilogue=None) if _epilogue(site) else site


def _device_of(example_inputs) -> torch.device:
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    return next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))


class Backend:
    """A torch.compile backend: `torch.compile(model, backend=torchfx_eff.backend(Config(...)))`."""

    def __init__(self, config: Config | None = None):
        self.config = config or Config.from_env()
        for kind in FAMILIES:
            setting = self.config.family(kind)
            unknown = set(setting) - set(kernels.names(kind)) if isinstance(setting, tuple) else set()
            if unknown:
                raise ValueError(f"Config.{kind} names unknown candidates {sorted(unknown)}; known: {kernels.names(kind)}")

    def __repr__(self):
        return f"torchfx_eff.backend({self.config})"

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        graph_id = report.new_graph_id()
        # packing, the gate and an unrewritten read need the originals that earlier graphs released
        memory.restore([*example_inputs, *gm.parameters(), *gm.buffers()], f"graph {graph_id}'s compile")
        try:
            rewritten, records, packed = self.rewrite_within_budget(gm, example_inputs, graph_id)
        except StageError as e:
            if self.config.strict:
                raise
            log.warning("torchfx_eff: graph %d left unoptimized: %s", graph_id, e)
            rewritten, packed = gm, []
            records = [SiteRecord(graph_id, "graph", "fallback", "-", reason=str(e))]
        if _dispatches(records) and self.config.inner != "eager":
            try:
                compiled = _compile_fx(rewritten, example_inputs, self.config, records, graph_id)
            except torch._dynamo.exc.RestartAnalysis:
                raise
            except Exception as e:  # should Inductor fail to lower a dispatch: rewrite again without them
                if self.config.strict:
                    raise
                rewritten, records, packed = self.rewrite_within_budget(gm, example_inputs, graph_id, dispatch=False)
                why = (f"Inductor could not compile the dispatch on rows ({type(e).__name__}: "
                       f"{(str(e).strip().splitlines() or [''])[0][:200]}); the choice at the example's size serves all")
                log.warning("torchfx_eff: graph %d: %s", graph_id, why)
                for r in records:
                    r.reason = f"{r.reason}; {why}" if r.kind == "linear" and r.status == "rewritten" else r.reason
                compiled = self.inner_compile(rewritten, gm, example_inputs, records, graph_id)
        else:
            compiled = self.inner_compile(rewritten, gm, example_inputs, records, graph_id)
        guarded = _guard_packed_weights(compiled, gm, packed, graph_id, self.config.log)
        runs = gm if any(r.kind == "graph" and r.status == "fallback" for r in records) else rewritten
        records += memory.settle(guarded, graph_id, runs, rewritten, example_inputs, [t for t, _ in packed],
                                 self.config.release_weights, records)
        report.add_graph(records, self.config.log)
        return guarded

    def rewrite_within_budget(self, gm: fx.GraphModule, example_inputs: list, graph_id: int, dispatch: bool = True):
        """rewrite(), then the graph check: per-site budgets compound over a graph's sites, so the rewritten graph's
        outputs are held to the accuracy budget against the original's, on the example inputs. Below it, the
        rewritten sites of lowest SQNR go back to the original, as few as bring the outputs within it (a bisection
        on their number); if none do, the stage fails and the graph runs unoptimized. An "outputs" record says what
        the check found."""
        result = self.rewrite(gm, example_inputs, graph_id, dispatch)
        revertible = sorted((r for r in result[1] if r.status == "rewritten" and r.site_id and r.sqnr_db is not None
                             and r.sqnr_db < float("inf")), key=lambda r: r.sqnr_db)
        if not revertible or not self.config.check_outputs:  # nothing rewritten, or only exactly
            return result
        with stage("graph check"):
            reference = gate.run_graph(gm, example_inputs)
            need = gate.graph_budget_db(self.config.accuracy, reference, len(revertible))
            measure = lambda rewritten: gate.compare_outputs(reference, gate.run_graph(rewritten, example_inputs))
            first, why = measure(result[0])
        accuracy, n = self.config.accuracy, len(revertible)
        floats = sum(t.is_floating_point() for t in reference)
        others = f" ({len(reference) - floats} others, not floating point, not compared)" if floats < len(reference) else ""
        outputs = lambda db: f"the rewritten graph's {floats} floating-point output(s){others} are at {db:.1f} dB of the original's"
        detail = f"{floats} outputs"
        if why is None and first >= need:
            result[1].append(SiteRecord(graph_id, "outputs", "checked", detail, sqnr_db=first,
                                        reason=f"{outputs(first)} on the example inputs, within the {accuracy!r} "
                                               f"budget of {need:.1f} dB"))
            return result
        failed = (f"{outputs(first)} ({why})" if why else f"{outputs(first)}") + \
            f", below the {accuracy!r} budget of {need:.1f} dB"
        if self.config.strict:
            raise RuntimeError(f"torchfx_eff: graph {graph_id} failed the graph check: {failed}")
        log.info("torchfx_eff: graph %d: %s; reverting its sites of lowest SQNR", graph_id, failed)
        members = {r.copy: r.packed for r in result[1] if r.kind == "siblings" and r.copy}

        def reverted(k: int):
            keep = {}
            why = (f"reverted by the graph check: with every site rewritten, {failed}; the {k} rewritten sites of "
                   f"lowest SQNR (theirs in the SQNR column) went back to the original")
            for r in revertible[:k]:
                keep.update(dict.fromkeys([r.site_id, *members.get(r.site_id, ())], (why, r.sqnr_db)))
            attempt = self.rewrite(gm, example_inputs, graph_id, dispatch, keep=keep)
            with stage("graph check"):
                db, why = measure(attempt[0])
            return (attempt, db), why is None and db >= need

        if (found := gate.fewest_reverted(n, reverted)) is None:
            raise StageError("graph check", RuntimeError(f"{failed}, and with all {n} rewritten sites reverted too"))
        high, ((rewritten, records, packed), db) = found
        records.append(SiteRecord(graph_id, "outputs", "checked", detail, sqnr_db=db,
                                  reason=f"{outputs(db)} on the example inputs after {high} of its {n} rewritten "
                                         f"sites went back to the original (at {first:.1f} dB with all of them), "
                                         f"within the {accuracy!r} budget of {need:.1f} dB"))
        return rewritten, records, packed

    def rewrite(self, gm: fx.GraphModule, example_inputs: list, graph_id: int, dispatch: bool = True,
                unfused: frozenset = frozenset(), keep: dict | None = None):
        """A rewritten copy of gm (gm itself is never modified), one record per site, and the parameters
        (with their version counters) that rewrites packed into constants. dispatch=False: no site dispatches
        on its row count; each takes its choice at the example's size. Under fuse_siblings="auto", sibling groups
        whose fused linear reads its concatenated weight as is are rewritten again unfused (unfused: their copies'
        names), unless Config.release_weights frees the members. keep: site id -> (why that site keeps the original,
        its rewrite's SQNR): the graph check reverted it."""
        config, keep = self.config, keep or {}
        with stage("normalize"):
            work = fx.GraphModule(gm, _copy_graph(gm))
            info = passes.GraphInfo(work, list(example_inputs))
            passes.normalize(info)
        with stage("siblings"):
            fuse = config.fuse_siblings is not False and config.family("linear") != "off"
            fused = passes.fuse_siblings(info, graph_id, unfused) if fuse else []
        with stage("match"):
            found = [s for kind, match in passes.MATCHERS.items() for s in match(info)]
        records, sites = fused, []
        for s in found:
            if isinstance(s, passes.Miss):
                records.append(_missed(graph_id, s))
            elif config.family(s.kind) == "off":
                records.append(_record(graph_id, s, "kept", f"Config.{s.kind}='off'"))
            else:
                sites.append(s)
        if config.fuse_epilogues:
            with stage("epilogues"):
                records += [_missed(graph_id, m) for m in passes.match_epilogues(sites, info)]
        with stage("cost"):
            spec = cost.SPECS[config.device]() if config.device else cost.detect(_device_of(example_inputs))
            if _replayed_from_cuda_graphs(config):
                spec = dataclasses.replace(spec, custom_op_s=0.0)  # no Python dispatches the custom ops
            plans = [(s, cost.candidates(s, spec, config)) for s in sites]
            regimes = {id(s): {label: cost.candidates(s, spec, config, hints) for label, hints in by_rows.items()}
                       for s in sites if dispatch and (by_rows := cost.regime_hints(s))}
            blocker = self._blocker(info)
            contested = lambda s, c: any(len(self._ranked(s, x)) > 1 for x in [c, *regimes.get(id(s), {}).values()])
            todo = [(s, c) for s, c in plans
                    if not blocker and _site_id(s) not in keep and (contested(s, c) or config.calibrate)]
        with stage("capture"):
            chains = {s.node: s.chain for s, _ in todo}
            chains.update({s.epilogue.out: s.chain + s.epilogue.nodes for s, _ in todo if _epilogue(s)})
            values = gate.capture(work, example_inputs, chains) if todo else {}
            for s, _ in todo:  # e.g. activation statistics for rewrites that smooth them (w8a8_smooth)
                s.inputs = values[s.node]
        if config.calibrate and todo:
            with stage("calibrate"):
                self._calibrate(todo, values, spec)
        rewriter = Rewriter(work)
        contested = {id(s) for s, _ in todo}  # sites where some candidate may beat the original (in some regime)
        for s, cands in plans:
            if blocker:
                records.append(_record(graph_id, s, "kept", blocker, cands, chosen="original"))
            elif _site_id(s) in keep:
                why, db = keep[_site_id(s)]
                records.append(_record(graph_id, s, "fallback", why, cands, chosen="original", sqnr_db=db))
            elif id(s) in contested:
                records.append(self._gate_and_rewrite(graph_id, s, cands, values, rewriter, regimes.get(id(s))))
            else:
                records.append(_record(graph_id, s, "kept", _why_kept(cands), cands, chosen="original"))
        if config.fuse_norms and not blocker:
            try:  # each fold is whole or not made: a failure here keeps the norms, not the graph's other rewrites
                with stage("norms"):
                    records += self._fold_norms(graph_id, work, example_inputs, rewriter)
            except StageError as e:
                if config.strict:
                    raise
                records.append(SiteRecord(graph_id, "norm", "fallback", "rms_norm", reason=f"norms kept: {e}"))
        with stage("rewrite"):
            rewritten = rewriter.finish()
        auto = config.fuse_siblings == "auto" and not config.release_weights
        read_as_is = copies_read_as_is(rewritten) if auto else set()
        if read_as_is:
            return self.rewrite(gm, example_inputs, graph_id, dispatch, unfused | read_as_is, keep)
        return rewritten, records, rewriter.packed

    def _fold_norms(self, graph_id, work: fx.GraphModule, example_inputs, rewriter: Rewriter) -> list[SiteRecord]:
        """Each RMSNorm that only weight-only Triton linears read, folded into them when every fold passes the
        gate at rounding level (against the unfused linear, on the example inputs); one record per norm."""
        op = torch.ops.torchfx_eff.weight_only_mm.default
        found = {}
        for node in work.graph.nodes:
            if node.target is op and isinstance(node.args[0], fx.Node) and (norm := passes.norms.find(node.args[0])):
                found[norm.out] = norm
        record = lambda norm, status, why, **kw: SiteRecord(graph_id, "norm", status, "rms_norm", passes.norms.label(norm),
                                                            reason=why, **kw)
        records, todo = [], []
        for norm in found.values():
            if why := passes.norms.foldable(norm, op):
                records.append(record(norm, "kept", why))
            else:
                todo.append(norm)
        if not todo:
            return records
        values = gate.capture(work, example_inputs, {r: norm.nodes + [r] for norm in todo for r in norm.out.users})
        for norm in todo:
            reps = [(r, kernels.Replacement(op, (), passes.norms.folded(r, norm))) for r in norm.out.users]
            checks = [gate.check(rep, values[r][r], values[r], "lossless") for r, rep in reps]
            db = min(db for db, _ in checks)
            if failed := [why for _, why in checks if why]:
                records.append(record(norm, "kept", f"folding it failed the gate: {failed[0]}", sqnr_db=db))
                continue
            for r, rep in reps:
                rewriter.apply(norm.nodes + [r], rep, prefix="norm")
            records.append(record(norm, "rewritten", f"folded into the {len(reps)} weight-only linear(s) reading it "
                                                     f"(eps={norm.eps:g})", sqnr_db=db))
        return records

    def _blocker(self, info: passes.GraphInfo) -> str | None:
        """A reason that no site of this graph may be rewritten, if there is one."""
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in info.example_inputs):
            return "autograd is on: rewrites are inference-only (run the model under torch.no_grad())"
        if not info.has_real_inputs:
            return "example inputs are fake tensors, so rewrites cannot be checked numerically"
        return None

    def _calibrate(self, todo, values, spec) -> None:
        calibration = cost.Calibration()
        for s, cands in todo:
            for impl, rec in cands:
                if not rec.applicable:
                    continue
                key = cost.site_key(spec.name, impl.name, s)
                if calibration.get(key) is None:  # the site alone, fused epilogue or not (nor credit, nor pass)
                    run = (functools.partial(gate.run_replacement, impl.replace(_unfused(s))) if impl.replace
                           else functools.partial(gate.run_chain, s.chain))
                    calibration.put(key, cost.seconds(lambda: run(values[s.node]), s.device))
                rec.measured_us = calibration.get(key) * 1e6
        calibration.save()

    def _ranked(self, site, cands):
        # with release_weights, a packed linear may be slower: an original that a graph keeps stays resident
        return cost.ranked(cands, memory_first=self.config.release_weights and site.kind in report.PACKED_KINDS)

    def _check(self, site, impl, values, fused: bool) -> tuple[kernels.Replacement | None, float | None, str | None]:
        """impl's replacement for the site (computing its epilogue too when fused), its SQNR and why it failed the
        gate (None if it passed). A fused replacement is checked against the original epilogue's value."""
        out = site.epilogue.out if fused else site.node
        try:
            with stage(f"replace:{impl.name}"):
                rep = impl.replace(site if fused else _unfused(site))
            with stage(f"gate:{impl.name}"):
                db, why = gate.check(rep, values[out][out], values[out], self.config.accuracy)
        except StageError as e:
            if self.config.strict:
                raise
            rep, db, why = None, None, str(e)
        if why is not None:
            if self.config.strict:
                raise RuntimeError(f"torchfx_eff: {impl.name} failed the numerics gate at {site.location}: {why}")
            log.info("torchfx_eff: %s: %s failed the gate: %s", site.location, impl.name, why)
        return rep, db, why

    def _gate_and_rewrite(self, graph_id, site, cands, values, rewriter: Rewriter, regimes=None) -> SiteRecord:
        """Try the ranked candidates in order; the first that passes the gate replaces the site. A candidate that
        fuses the site's epilogue is tried with it, then without. With shape regimes (symbolic rows), each regime
        gets its first passing candidate, and when they differ the site becomes a run-time dispatch on the row
        count (fused only if every regime's choice fuses: both branches compute one value)."""
        checked = {}  # (candidate name, fused) -> _check's result; gated once for all regimes

        def first_passing(ranked, fuse: bool):
            for impl, _ in ranked:
                if impl.replace is None:
                    return impl, None, False
                for fused in (True, False) if fuse and impl.fuses_epilogue(site) else (False,):
                    if (impl.name, fused) not in checked:
                        checked[impl.name, fused] = self._check(site, impl, values, fused)
                    rep, _, why = checked[impl.name, fused]
                    if why is None:
                        return impl, rep, fused
            raise AssertionError("ranked candidates end with the original")

        by_label = {label: self._ranked(site, c) for label, c in (regimes or {"": cands}).items()}
        winners = {label: first_passing(ranked, True) for label, ranked in by_label.items()}
        if len({fused for _, _, fused in winners.values()}) > 1:
            winners = {label: first_passing(ranked, False) for label, ranked in by_label.items()}
        fused = next(iter(winners.values()))[2]
        failures = [f"{name}{' with its epilogue' * f} failed the gate: {why}"
                    for (name, f), (_, _, why) in checked.items() if why is not None]
        by_regime = {label: {"chosen": impl.name, "estimates_us": {r.name: r.time_us for _, r in regimes[label]}}
                     for label, (impl, _, _) in winners.items()} if regimes else {}
        reps = [rep for _, rep, _ in winners.values()]
        if all(rep is None for rep in reps):
            status = "fallback" if failures else "kept"
            return _record(graph_id, site, status, "; ".join(failures) or _why_kept(cands), cands, chosen="original",
                           regimes=by_regime)
        impls = [impl for impl, _, _ in winners.values()]
        if len({impl.name for impl in impls}) == 1:
            rep, chosen, how = reps[0], impls[0].name, "fastest candidate that passed the numerics gate"
            mine, original = (next(r.time_us for _, r in cands if r.name == n) for n in (chosen, "original"))
            if self.config.release_weights and None not in (mine, original) and mine >= original * cost.MARGIN:
                how = (f"Config.release_weights: packed so that the original can be released, though estimated at "
                       f"{mine:.1f} us against the original's {original:.1f} us")
        else:
            rep, chosen, how = self._dispatch(site, impls, reps, cands)
        if _epilogue(site) and not fused:
            refusing = [impl.name for impl in impls if not impl.fuses_epilogue(site)]
            why = f"{' and '.join(refusing)} does not fuse it here" if refusing else "fused, it failed the gate"
            how += f"; its epilogue ({site.epilogue}) stays as graph ops: {why}"
        with stage("rewrite"):
            rewriter.apply(site.chain + site.epilogue.nodes if fused else site.chain, rep, prefix=f"{site.kind}_{chosen}")
        db = min((checked[i.name, fused][1] for i in impls if (i.name, fused) in checked), default=None)
        return _record(graph_id, site, "rewritten", "; ".join(failures + [how]), cands, chosen=chosen, sqnr_db=db,
                       weight_bytes=rep.weight_bytes, packed=sorted(rep.sources), regimes=by_regime,
                       epilogue=str(site.epilogue) if fused else "")

    def _dispatch(self, site, impls, reps, cands):
        """(replacement, chosen at the example's size, reason) for a site whose regimes chose differently. A fused
        site's original branch runs its member linears (siblings.separately)."""
        members = separately(site.node.graph.owning_module, site.weight_name, site.x)
        original = (kernels.Replacement(*members) if members else
                    kernels.Replacement(site.node.target, site.node.args, site.node.kwargs))
        small, large = (rep or original for rep in reps)
        after = sum(rep.weight_bytes[1] for rep in reps if rep is not None and rep.weight_bytes)  # packed only
        rep = rows_dispatch(site.x, cost.SPLIT_ROWS, small, large, weight_bytes=(site.weight.nbytes, after))
        example_rows = site.size(site.rows)
        chosen = impls[0].name if example_rows <= cost.SPLIT_ROWS else impls[1].name
        how = (f"dispatch on rows: {impls[0].name} for {site.rows}<={cost.SPLIT_ROWS}, {impls[1].name} above "
               f"(each the fastest passing candidate of its regime)")
        return rep, chosen, how

    def inner_compile(self, rewritten: fx.GraphModule, original: fx.GraphModule, example_inputs, records: list,
                      graph_id: int):
        """Compile the rewritten graph; if the inner compiler fails on it, the original, and say so in records."""
        if self.config.inner == "eager":
            return rewritten.forward
        try:
            return _compile_fx(rewritten, example_inputs, self.config, records, graph_id)
        except torch._dynamo.exc.RestartAnalysis:
            raise  # not a failure: Dynamo re-traces the frame (e.g. to specialize a float) and calls us again
        except Exception as e:
            if self.config.strict or rewritten is original:
                raise
            why = f"inner compile failed on the rewritten graph ({type(e).__name__}: {e}); the original graph runs"
            log.warning("torchfx_eff: graph %d: %s", graph_id, why)
            for r in records:
                if r.status == "rewritten":
                    r.status, r.chosen, r.reason = "fallback", "original", why
            records.append(SiteRecord(graph_id, "graph", "fallback", "-", reason=why))
            return _compile_fx(original, example_inputs, self.config, records, graph_id)


def _compile_fx(gm: fx.GraphModule, example_inputs, config: Config, records: list, graph_id: int):
    """Inductor under Config's options; where it fails with combo kernels, again without them (an "inductor" record
    says so: a newer Inductor feature, where our rewrites are not the cause)."""
    from torch._inductor.compile_fx import compile_fx

    try:
        with torch._inductor.config.patch(_inductor_options(config)):
            return compile_fx(gm, example_inputs)
    except torch._dynamo.exc.RestartAnalysis:
        raise
    except Exception as e:
        if config.strict or not config.combo_kernels:
            raise
        compiled = _compile_fx(gm, example_inputs, dataclasses.replace(config, combo_kernels=False), records, graph_id)
        why = (f"Inductor failed with combo kernels ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); "
               f"compiled without them")
        log.warning("torchfx_eff: graph %d: %s", graph_id, why)
        records.append(SiteRecord(graph_id, "inductor", "fallback", "combo_kernels", reason=why))
        return compiled


def _dispatches(records) -> bool:
    """Whether some rewritten site dispatches on its row count (its regimes chose differently)."""
    return any(len({r["chosen"] for r in rec.regimes.values()}) > 1 for rec in records if rec.status == "rewritten")


def _inductor_options(config: Config) -> dict:
    """Inductor settings of the inner compile: those of torch.compile's mode when Config.inner names one, and
    Config.combo_kernels."""
    mode = {} if config.inner in ("inductor", "eager") else torch._inductor.list_mode_options(config.inner)
    return {**mode, "combo_kernels": config.combo_kernels}


def _replayed_from_cuda_graphs(config: Config) -> bool:
    if config.cuda_graphs != "auto":
        return config.cuda_graphs == "on"
    return config.inner != "eager" and _inductor_options(config).get("triton.cudagraphs",
                                                                     torch._inductor.config.triton.cudagraphs)


def _guard_packed_weights(compiled, original: fx.GraphModule, packed, graph_id: int, log_path):
    """Run the original graph once a parameter that was packed at compile time has been modified in place
    (load_state_dict, an optimizer step): the packed copy would be stale. Dynamo does not guard on values.
    The returned callable lives as long as Dynamo keeps the graph: memory.py registers the graph's reads on it."""
    boxed = getattr(compiled, "_boxed_call", False)
    state = {"stale": False}

    def run(*args):
        inputs = (args[0] if args else []) if boxed else args  # a graph of no inputs is called with none
        if not state["stale"] and any(t._version != v for t, v in packed):
            state["stale"] = True
            why = "parameters changed after compile; running the unoptimized graph (recompile to re-optimize)"
            log.warning("torchfx_eff: graph %d: %s", graph_id, why)
            # the original graph reads every weight as is: those released come back and stay
            kept = memory.settle(run, graph_id, original, original, list(inputs), [], False, [])
            report.add_graph([SiteRecord(graph_id, "graph", "fallback", "-", reason=why), *kept], log_path)
        if state["stale"]:
            return original.forward(*inputs)
        return compiled(*args)

    run._boxed_call = boxed
    return run


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def _why_kept(cands) -> str:
    others = [r for i, r in cands if i.replace is not None and r.applicable and r.time_us is not None]
    if not others:
        refused: dict[str, list[str]] = {}
        for i, r in cands:
            if i.replace is not None and not r.applicable:
                refused.setdefault(r.reason, []).append(r.name)
        why = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in refused.items())
        return f"no applicable candidate ({why})" if why else "no applicable candidate"
    best = min(others, key=lambda r: r.time_us)
    original = next(r for i, r in cands if i.replace is None)
    if original.time_us is None:
        return f"the original's cost could not be estimated ({original.formula}), so it is kept"
    return f"original ({original.time_us:.1f} us) not beaten by {1 / cost.MARGIN - 1:.0%}: best is {best.name} ({best.time_us:.1f} us)"


def backend(config: Config | None = None) -> Backend:
    """The compiler callable for torch.compile(..., backend=...)."""
    return Backend(config)


def default_backend(gm: fx.GraphModule, example_inputs: list):
    """What backend="torchfx_eff" resolves to (the torch_dynamo_backends entry point): config from env."""
    return Backend()(gm, example_inputs)
