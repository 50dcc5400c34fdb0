"""MoE experts: products by stacked expert weights (passes/experts.py) and their int8 weight-only rewrite
(kernels/experts.py), checked against fp64 products of the dequantized weights and against the original graph."""
import pytest
import torch
import torch.nn.functional as F

import torchfx_eff
from helpers import compiled, compiles_for_sm90, experts_packed, experts_reference, found_sites, sites, sqnr_ref
from torchfx_eff.kernels import experts, weight_only_triton

E, N, K = 4, 256, 256


# rows per expert: empty experts, one expert over several row blocks (16 a block in the interpreter), one row
COUNTS = [3, 0, 37, 1, 0]
PATHS = [(True, torch.float32), (True, torch.float16), (False, torch.float32), (False, torch.bfloat16)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("triton_kernel,dtype", PATHS)
def test_grouped_kernel_matches_fp64(bits, triton_kernel, dtype):
    torch.manual_seed(0)
    n, k = 80, 208  # edge tiles in N and K (blocks of 64), K not a multiple of int4's group; multiples of 16 for ATen
    packed, dequantized = experts_packed(torch.randn(len(COUNTS), n, k), bits, triton_kernel)
    offs = torch.tensor(COUNTS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    x = torch.randn(sum(COUNTS) + 2, k).to(dtype)  # two rows past offs[-1]
    out = experts.experts_weight_only_mm(x, *packed, offs, bits, 64, triton_kernel)
    ref = experts_reference(x, dequantized, offs)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    # the Triton kernel keeps x's dtype (fp32 exact up to fp32 sums; fp16 rounds int4's dequantized weights once);
    # ATen's takes bf16 activations
    need = {torch.float32: 100.0, torch.float16: 55.0}[dtype] if triton_kernel else 40.0
    assert sqnr_ref(ref, out) >= need


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("triton_kernel", [True, False])
def test_batched_product_is_the_grouped_one_with_equal_groups(bits, triton_kernel):
    torch.manual_seed(0)
    packed, dequantized = experts_packed(torch.randn(3, 48, 64), bits, triton_kernel)
    x = torch.randn(3, 5, 64)
    out = experts.batched_experts_mm(x, *packed, bits, 64, triton_kernel)
    ref = torch.bmm(x.double(), dequantized.transpose(1, 2))
    assert out.shape == (3, 5, 48) and sqnr_ref(ref, out) >= (100.0 if triton_kernel else 40.0)


def test_grouped_kernel_rejects_mismatched_shapes():
    packed, _ = experts_packed(torch.randn(3, 16, 32))
    with pytest.raises(ValueError, match=r"the int8 weights 32"):
        experts.experts_weight_only_mm(torch.randn(4, 16), *packed, torch.tensor([1, 2, 4]), 8, 0, False)
    with pytest.raises(ValueError, match=r"offs \[E\]"):
        experts.experts_weight_only_mm(torch.randn(4, 32), *packed, torch.tensor([4]), 8, 0, False)
    with pytest.raises(ValueError, match=r"K=40 is not a multiple of 16"):  # rather than crash in ATen
        packed, _ = experts_packed(torch.randn(3, 16, 40))
        experts.experts_weight_only_mm(torch.randn(4, 40), *packed, torch.tensor([1, 2, 4]), 8, 0, False)
    with pytest.raises(ValueError, match=r"bits 4 or 8"):
        experts.experts_weight_only_mm(torch.randn(4, 32), *packed, torch.tensor([1, 2, 4]), 2, 0, False)


class Experts(torch.nn.Module):
    """MoE experts as transformers keeps them: one stacked parameter, each expert's tokens times its matrix in one
    batched product (bmm over [E, T, K]) or one grouped product over tokens sorted by expert (_grouped_mm, from an
    [E, N, K] stack transposed, or an [E, K, N] one as is)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        shape = (E, K, N) if how == "grouped_mm_ekn" else (E, N, K)
        self.w = torch.nn.Parameter(torch.randn(shape) / K ** 0.5)

    def forward(self, x):
        if self.how == "bmm":
            return torch.bmm(x, self.w.transpose(1, 2))
        offs = torch.tensor([2, 2, 6, 8], dtype=torch.int32)  # expert 1 has no tokens
        w = self.w if self.how == "grouped_mm_ekn" else self.w.transpose(-2, -1)
        return torch._grouped_mm(x.flatten(0, 1), w, offs=offs)

    def dequantized_reference(self, x, bits=8) -> torch.Tensor:
        w = self.w.transpose(1, 2) if self.how == "grouped_mm_ekn" else self.w
        _, dequantized = experts_packed(w.detach().float(), bits, triton_kernel=x.dtype != torch.bfloat16)
        if self.how == "bmm":
            return torch.bmm(x.double(), dequantized.transpose(1, 2))
        return experts_reference(x.flatten(0, 1), dequantized, torch.tensor([2, 2, 6, 8]))


# candidate -> (bits, packed bytes of the (E, N, K) stack, its least SQNR against the bf16 original)
CANDIDATES = {"int8_weight_only": (8, E * N * K + E * N * 2, 35.0), "int4_weight_only": (4, E * N * K // 2 + E * N * K // 16, 15.0)}


@pytest.mark.parametrize("name", CANDIDATES)
@pytest.mark.parametrize("how", ["bmm", "grouped_mm", "grouped_mm_ekn"])
def test_stacked_expert_weights_are_rewritten(how, name):
    bits, packed_bytes, least_db = CANDIDATES[name]
    torch.manual_seed(0)
    model = Experts(how).to(torch.bfloat16)
    x = torch.randn(E, 2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, experts=(name,), accuracy="aggressive")(x)
    [site] = sites("experts")
    assert site.status == "rewritten" and site.chosen == name, torchfx_eff.last_report()
    assert site.hints["E"] == E and site.hints["N"] == N and site.hints["K"] == K
    assert site.weight_bytes == (E * N * K * 2, packed_bytes)
    assert sqnr_ref(model.dequantized_reference(x, bits), out) >= 40.0  # the packed weights' product, in bf16
    assert sqnr_ref(ref, out) >= least_db


@pytest.mark.parametrize("name", CANDIDATES)
def test_triton_kernel_serves_the_site(name, monkeypatch):
    """With the interpreter costed as fast, the site takes the Triton kernel (fp32 activations, no bf16 cast; fp32
    rules _grouped_mm out, so the batched product)."""
    monkeypatch.setattr(weight_only_triton, "INTERPRETER_SLOWDOWN", 1e-3)
    torch.manual_seed(0)
    model = Experts("bmm")
    x = torch.randn(E, 2, K)
    with torch.no_grad():
        out = compiled(model, experts=(name,), accuracy="aggressive")(x)
    [site] = sites("experts")
    assert site.status == "rewritten" and site.chosen == name
    assert sqnr_ref(model.dequantized_reference(x, CANDIDATES[name][0]), out) >= 100.0  # no bf16 rounding anywhere


def test_experts_off_keeps_them_and_unknown_candidates_are_refused():
    model = Experts("bmm").to(torch.bfloat16)
    with torch.no_grad():
        compiled(model, experts="off")(torch.randn(E, 2, K, dtype=torch.bfloat16))
    [site] = sites("experts")
    assert site.status == "kept" and "Config.experts='off'" in site.reason
    with pytest.raises(ValueError, match="Config.experts names unknown candidates"):
        torchfx_eff.backend(torchfx_eff.Config(experts=("int3",)))


def test_released_expert_weights():
    model = Experts("grouped_mm").to(torch.bfloat16)
    x = torch.randn(E, 2, K, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, release_weights=True)(x)
    [weight] = sites("weight")
    assert weight.status == "released" and weight.weight_bytes == (E * N * K * 2, 0)
    assert sqnr_ref(ref, out) >= 35.0
    torchfx_eff.restore_weights(model)
    assert torch.equal(model(x), ref)


class Gathered(torch.nn.Module):
    """transformers' batched_mm experts: each row times its expert's matrix, gathered from the stack by the row's
    expert id; an [E, N, K] stack first (bmm(W[ids], x.unsqueeze(-1))) or an [E, K, N] one second."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn((E, K, N) if how == "ekn" else (E, N, K)) / K ** 0.5)

    def forward(self, x, ids):
        if self.how == "ekn":
            return torch.bmm(x.unsqueeze(1), self.w[ids]).squeeze(1)
        return torch.bmm(self.w[ids], x.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("how", ["enk", "ekn"])
def test_gathered_expert_products_are_rewritten(how):
    torch.manual_seed(0)
    model = Gathered(how).to(torch.bfloat16)
    x, ids = torch.randn(6, K, dtype=torch.bfloat16), torch.tensor([3, 0, 3, 1, 0, 3])  # unsorted; expert 2 unused
    _, dequantized = experts_packed((model.w.transpose(1, 2) if how == "ekn" else model.w).detach().float())
    with torch.no_grad():
        ref = model(x, ids)
        out = compiled(model)(x, ids)
    [site] = sites("experts")
    assert site.status == "rewritten" and site.chosen == "int8_weight_only", torchfx_eff.last_report()
    want = torch.stack([x[s].double() @ dequantized[e].T for s, e in enumerate(ids.tolist())])
    assert out.shape == ref.shape and sqnr_ref(want, out) >= 40.0 and sqnr_ref(ref, out) >= 35.0


class Unmatched(torch.nn.Module):
    """Products by a stack that no candidate takes: a slice of the stack, the stack as the first operand, baddbmm."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = torch.nn.Parameter(torch.randn(E, N, K) / K ** 0.5)

    def forward(self, x, ids):
        if self.how == "sliced":
            return torch.bmm(x.view(E, -1, K), self.w[:, :N // 2].transpose(1, 2))
        if self.how == "first":
            return torch.bmm(self.w, x.view(E, K, -1))
        return torch.baddbmm(torch.zeros(E, x.shape[0] // E, N, dtype=x.dtype), x.view(E, -1, K), self.w.transpose(1, 2))


@pytest.mark.parametrize("how,why", [("sliced", "indexed or reshaped first"), ("first", "as the first operand"),
                                     ("baddbmm", "through baddbmm")])
def test_other_products_by_a_stack_are_missed_with_reason(how, why):
    model = Unmatched(how).to(torch.bfloat16)
    x, ids = torch.randn(8, K, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        ref = model(x, ids)
        out = compiled(model)(x, ids)
    [miss] = sites("experts")
    assert miss.status == "missed" and f"stack of {E} weight matrices" in miss.reason and why in miss.reason
    assert str((E, N, K)) in miss.reason and sites("linear") == []
    assert torch.equal(out, ref)


MOE = {"mixtral": dict(num_local_experts=4), "qwen3_moe": dict(num_experts=4, moe_intermediate_size=512),
       "gpt_oss": dict(num_local_experts=4), "llama4_text": dict(num_local_experts=4),
       "mixtral:batched_mm": dict(num_local_experts=4)}  # type:experts implementation (grouped_mm where available)


@pytest.mark.parametrize("model_type", MOE)
def test_hf_moe_experts_are_rewritten(model_type):
    """Small bf16 MoE models at two tokens (decode-like: few rows an expert, where int8 wins on CPU): every stacked
    expert parameter is an experts site, rewritten int8, outputs close."""
    import transformers as T

    torch.manual_seed(0)
    name, _, experts_implementation = model_type.partition(":")
    cfg = T.AutoConfig.for_model(name, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=128,
                                 num_experts_per_tok=2, **MOE[model_type])
    if experts_implementation:
        cfg._experts_implementation = experts_implementation
    model = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(3, 100, (1, 2))
    with torch.no_grad(), found_sites("experts") as found:
        ref = model(ids).logits
        out = compiled(model, linear="off")(ids).logits
    stacks = {id(p) for n, p in model.named_parameters() if p.dim() == 3}
    assert stacks and {id(s.weight) for s in found} == stacks
    assert [s.status for s in sites("experts")] == ["rewritten"] * len(stacks), [s.reason for s in sites("experts")]
    assert sqnr_ref(ref, out) >= 30.0


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_symbolic_rows_dispatch_between_int8_for_decode_and_the_original_for_prefill(inner):
    """Rows symbolic (a second length recompiles): the experts site is costed at S=2 and S=1024 (pinned CPU spec:
    int8 wins few rows, the bf16 product many) and one graph dispatches on S; each side is that choice's output."""
    torch.manual_seed(0)
    model = Experts("bmm").to(torch.bfloat16)
    cm = compiled(model, inner=inner)
    with torch.no_grad():
        for tokens in (1, 2):
            cm(torch.randn(E, tokens, K, dtype=torch.bfloat16))
    site = [s for s in sites("experts") if s.graph_id == max(s.graph_id for s in sites("experts"))][0]
    assert list(site.regimes) == ["S<=16 (at S=8)", "S>16 (at S=2048)"], site.regimes
    assert [r["chosen"] for r in site.regimes.values()] == ["int8_weight_only", "original"], site.regimes
    assert site.status == "rewritten" and "dispatch on rows" in site.reason
    _, dequantized = experts_packed(model.w.detach().float())
    with torch.no_grad():
        for tokens in (3, 5):  # S = 12 and 20 rows
            x = torch.randn(E, tokens, K, dtype=torch.bfloat16)
            out = cm(x)
            if E * tokens <= 16:
                assert sqnr_ref(torch.bmm(x.double(), dequantized.transpose(1, 2)), out) >= 40.0
            else:
                torch.testing.assert_close(out, model(x), rtol=0 if inner == "eager" else 2 ** -7, atol=0 if inner == "eager" else 1e-2)


class IndexedExperts(torch.nn.Module):
    """Experts as JetMoE (and hand-written MoE code) runs them: a loop of F.linear over a stack's matrices W[i], each
    on its expert's rows."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(E, N, K) / K ** 0.5)

    def forward(self, x):
        return torch.cat([F.linear(part, self.w[i]) for i, part in enumerate(x.chunk(E))])


def test_a_stacks_matrices_read_one_by_one_are_linear_sites_and_release_the_stack():
    torch.manual_seed(0)
    model = IndexedExperts().to(torch.bfloat16)
    x = torch.randn(2 * E, K, dtype=torch.bfloat16)
    _, dequantized = experts_packed(model.w.detach().float())
    with torch.no_grad():
        ref = model(x)
        out = compiled(model, release_weights=True)(x)
    linears = sites("linear")
    assert [s.status for s in linears] == ["rewritten"] * E, torchfx_eff.last_report()
    assert sorted(s.site_id[-3:] for s in linears) == [f"[{i}]" for i in range(E)]  # each names its matrix
    want = torch.cat([part.double() @ w.T for part, w in zip(x.chunk(E), dequantized)])
    assert sqnr_ref(want, out) >= 40.0 and sqnr_ref(ref, out) >= 35.0
    [weight] = sites("weight")  # every matrix packed: the stack itself goes
    assert weight.status == "released" and weight.weight_bytes == (E * N * K * 2, 0)
    torchfx_eff.restore_weights(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_jetmoe_experts_are_linear_sites():
    """JetMoE's experts (and its mixture of attention heads) index their stacks in a loop: every product is a site."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.AutoConfig.for_model("jetmoe", hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, kv_channels=64, vocab_size=128,
                                 num_local_experts=4, num_experts_per_tok=2)
    model = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(3, 100, (1, 2))
    with torch.no_grad(), found_sites("linear") as found:
        compiled(model)(input_ids=ids)
    assert sites("linear", "missed") == [] and sites("graph") == []
    stacks = {id(p) for p in model.parameters() if p.dim() == 3}
    assert {id(s.weight._base) for s in found if getattr(s, "weight", None) is not None and s.weight._base is not None} == stacks


EXPERTS_CONFIGS_FOR_SM90 = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from torchfx_eff.kernels import experts

fn = experts._experts_tuned.fn
failed = []
for bits, weight in ((8, "*i8"), (4, "*u8")):
    for config in experts._experts_tuned.configs:
        given = {"BITS": bits, "GROUP": 64, "IEEE": False, **config.kwargs}
        types = {"X": "*bf16", "W": weight, "S": "*bf16", "Z": "*bf16", "Offs": "*i32", "Out": "*bf16"}
        signature = {n: "constexpr" if n in given else types.get(n, "i32") for n in fn.arg_names}
        try:
            triton.compile(ASTSource(fn, signature, given), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        except Exception as e:
            failed.append(f"bits={bits} {config}: {str(e).splitlines()[0]}")
print(failed or "compiled")
"""


def test_every_experts_config_compiles_for_sm90():
    """Both bits of the experts kernel in every tuned config compile for the H100 (bf16), without a GPU."""
    compiles_for_sm90(EXPERTS_CONFIGS_FOR_SM90)
