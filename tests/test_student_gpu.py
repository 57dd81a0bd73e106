"""CUDA checks of the student (device machine): fla's Triton chunk kernels (bf16) against float32
references, forward and gradients, with an initial state; plus a bf16 student end to end.

Needs ``pip install flash-linear-attention==0.6.0 fla-core==0.6.0``. Skips only without CUDA; a
CUDA machine without fla fails (the kernels are what this file checks).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.student.ops import (
    RWKV7_LOG_DECAY_MIN,
    fla_available,
    rwkv6_chunked,
    rwkv6_fla,
    rwkv6_recurrent,
    rwkv7_chunked,
    rwkv7_fla,
    rwkv7_recurrent,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOL = 2e-2  # relative error ||a - b|| / ||b|| that bf16 inputs and outputs allow
DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _require_fla() -> None:
    assert fla_available(), ("flash-linear-attention is not importable: pip install "
                             "'flash-linear-attention==0.6.0' 'fla-core==0.6.0'")


def _rwkv6_inputs(b: int, t: int, h: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    def rn(*shape): return torch.randn(*shape, generator=g, device=DEV)
    return {"r": rn(b, t, h, d) * 0.5, "k": rn(b, t, h, d) * 0.5, "v": rn(b, t, h, d),
            # log decays like a trained x060 layer: -exp(time_decay + lora), time_decay in [-6, -1]
            "w": -torch.exp(torch.empty(b, t, h, d, device=DEV).uniform_(-6, 0.5, generator=g)),
            "u": rn(h, d) * 0.5}


def _rwkv7_inputs(b: int, t: int, h: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    def rn(*shape): return torch.randn(*shape, generator=g, device=DEV)
    kk = F.normalize(rn(b, t, h, d), dim=-1)
    gate = torch.sigmoid(rn(b, t, h, d))
    return {"r": rn(b, t, h, d) * 0.5, "w": RWKV7_LOG_DECAY_MIN * torch.sigmoid(rn(b, t, h, d)),
            "k": rn(b, t, h, d) * 0.5, "v": rn(b, t, h, d), "a": -kk, "b": kk * gate}


def _run(fn, inputs: dict[str, torch.Tensor], state: torch.Tensor, dtype: torch.dtype,
         do: torch.Tensor,
         dht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward of ``fn`` on ``dtype`` copies of the (bf16-rounded) inputs."""
    leaves = {k: v.to(dtype).detach().requires_grad_(True) for k, v in inputs.items()}
    s0 = state.detach().clone().requires_grad_(True)
    o, s = fn(*leaves.values(), initial_state=s0)
    ((o.float() * do).sum() + (s.float() * dht).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads["h0"] = s0.grad
    return o.detach(), s.detach(), grads


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize("head_size", [64, 128])
def test_fla_kernel_matches_float32_reference(mixer: str, head_size: int) -> None:
    _require_fla()
    b, t, h = 2, 300, 4  # T not a multiple of the kernels' chunk size
    make, kernel, ref = ((_rwkv6_inputs, rwkv6_fla, rwkv6_recurrent) if mixer == "rwkv6"
                         else (_rwkv7_inputs, rwkv7_fla, rwkv7_recurrent))
    inputs = {k: v.bfloat16().float() for k, v in make(b, t, h, head_size, seed=0).items()}
    state = torch.randn(b, h, head_size, head_size, device=DEV) * 0.1
    do = torch.randn(b, t, h, head_size, device=DEV)
    dht = torch.randn(b, h, head_size, head_size, device=DEV) * 0.1
    o_ref, s_ref, g_ref = _run(ref, inputs, state, torch.float32, do, dht)
    o, s, g = _run(kernel, inputs, state, torch.bfloat16, do, dht)
    errors = ({"o": rel(o, o_ref), "state": rel(s, s_ref)}
              | {f"d{k}": rel(g[k], g_ref[k]) for k in g_ref})
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"{mixer} head {head_size}: relative errors above {TOL}: {bad} (all: {errors})"


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_torch_chunked_path_on_cuda(mixer: str) -> None:
    """The fallback path (no fla) on CUDA in bf16 and float32 against the float32 recurrent loop."""
    make, chunked, ref = ((_rwkv6_inputs, rwkv6_chunked, rwkv6_recurrent) if mixer == "rwkv6"
                          else (_rwkv7_inputs, rwkv7_chunked, rwkv7_recurrent))
    inputs = make(2, 150, 4, 64, seed=1)
    state = torch.randn(2, 4, 64, 64, device=DEV) * 0.1
    o_ref, s_ref = ref(*inputs.values(), initial_state=state)
    o32, s32 = chunked(*inputs.values(), initial_state=state)
    assert rel(o32, o_ref) < 1e-4 and rel(s32, s_ref) < 1e-4
    obf, _ = chunked(*(x.bfloat16() for x in inputs.values()), initial_state=state)
    assert obf.dtype == torch.bfloat16 and rel(obf, o_ref) < TOL


@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_bf16_student_on_cuda(mixer: str) -> None:
    """A bf16 student on CUDA: fla path ~ PyTorch chunked path; chunked prefill, generation,
    align backward."""
    _require_fla()
    from shared.student import HybridRWKVCache, convert_teacher
    from shared.tiny import tiny_teacher

    # head size 128: the shape of the shipped fla configs (other head sizes tune for minutes)
    teacher = tiny_teacher("llama", layers=4, hidden=512, heads=4, kv_heads=2, vocab=512).to(DEV)
    torch.manual_seed(0)
    student = convert_teacher(teacher, dict(layers=[0, 1, 3], mixer=mixer, ffn="rwkv_cmix")).eval()
    ids = torch.randint(3, 512, (2, 200), device=DEV)
    student.to(torch.bfloat16)
    with torch.no_grad():
        # same bf16 model, PyTorch WKV: isolates the kernel's error
        student.set_rwkv_kernel("chunk")
        ref = student(ids).logits
        student.set_rwkv_kernel("auto")  # fla kernels for multi-token calls
        got = student(ids).logits
        cache = HybridRWKVCache(student.config)
        first = student(ids[:, :120], past_key_values=cache, use_cache=True).logits
        rest = student(ids[:, 120:], past_key_values=cache, use_cache=True).logits
    assert rel(got, ref) < TOL
    assert rel(torch.cat([first, rest], 1), got) < TOL
    assert student.generate(ids[:, :50], max_new_tokens=8, min_new_tokens=8,
                            do_sample=False).shape == (2, 58)
    student.train()
    states = {i: torch.randn(2, 200, 512, device=DEV, dtype=torch.bfloat16) for i in range(4)}
    out = student.align_forward(states)
    sum(o.float().pow(2).mean() for o in out.values()).backward()
    grads = [p.grad for n, p in student.named_parameters()
             if n in set(student.mixer_parameter_names())]
    assert grads and all(gr is not None and torch.isfinite(gr.float()).all() for gr in grads)


@pytest.mark.parametrize("layout", ["segments", "per_document"])
@pytest.mark.parametrize("mixer", ["rwkv6", "rwkv7"])
def test_packed_documents_on_cuda(mixer: str, layout: str) -> None:
    """Packed rows through the fla kernels (varlen segments, or the per-document re-layout) equal
    each document alone; the two layouts' gradients agree."""
    _require_fla()
    from shared.student import convert_teacher
    from shared.tiny import tiny_teacher

    # SmolLM2-135M's heads (9 x 64): the shipped fla configs hold them, so neither layout tunes
    # (at 4 x 128 each parametrisation tuned for minutes on a fresh H200, 2026-12-02)
    teacher = tiny_teacher("llama", layers=3, hidden=576, heads=9, kv_heads=3, vocab=512).to(DEV)
    torch.manual_seed(0)
    student = convert_teacher(teacher, dict(layers=[0, 2], mixer=mixer, ffn="rwkv_cmix"))
    student = student.to(torch.bfloat16).eval()
    student.model.packed_layout = layout
    rows = [[70, 33, 100, 53], [1, 200, 55]]  # a one-token document; lengths off chunk multiples
    ids = torch.randint(3, 512, (2, 256), device=DEV)
    positions = torch.stack([torch.cat([torch.arange(n, device=DEV) for n in row])
                             for row in rows])
    with torch.no_grad():
        packed = student(ids, position_ids=positions, use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for n in row:
                alone = student(ids[r:r + 1, at:at + n], use_cache=False).logits[0]
                assert rel(packed[r, at:at + n], alone) < TOL, (r, at, n)
                at += n
    grads = {}
    for name in ("segments", "per_document"):
        student.model.packed_layout = name
        student.zero_grad(set_to_none=True)
        student.train()
        logits = student(ids, position_ids=positions, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        grads[name] = {n: p.grad.float() for n, p in student.named_parameters()
                       if p.grad is not None}
    assert grads["segments"].keys() == grads["per_document"].keys()
    for n, g in grads["segments"].items():
        assert rel(g, grads["per_document"][n]) < TOL, n


def test_compiled_layers_equal_eager_ones_on_fla() -> None:
    """train.compile's layers (shared/compiling.py) on the GPU: fla's kernels run eagerly between
    the compiled parts, and the compiled bf16 student is as close to the float32 truth as the
    eager bf16 one is, packed rows too, forward and gradients."""
    _require_fla()
    import copy

    from torch._dynamo.utils import counters

    from shared.compiling import compile_decoder_layers
    from shared.student import convert_teacher
    from shared.tiny import tiny_teacher

    torch._dynamo.reset()
    teacher = tiny_teacher("llama", layers=4, hidden=576, heads=9, kv_heads=3, vocab=512).to(DEV)
    torch.manual_seed(0)
    truth = convert_teacher(teacher, dict(layers=[1, 2], mixer="rwkv7"))  # float32: chunked WKV
    eager = copy.deepcopy(truth).to(torch.bfloat16)  # bf16: fla
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled.model.layers, "default") == 4
    ids = torch.randint(3, 512, (2, 256), device=DEV)
    rows = [[70, 33, 100, 53], [1, 200, 55]]
    positions = torch.stack([torch.cat([torch.arange(n, device=DEV) for n in row])
                             for row in rows])
    results = []
    for student in (truth, eager, compiled):
        counters.clear()
        student.train().zero_grad(set_to_none=True)
        logits = student(ids, position_ids=positions, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.float() for n, p in student.named_parameters() if p.grad is not None}
        results.append((logits.detach().float(), grads))
    assert counters["stats"]["unique_graphs"] > 0  # the last student's layers did run compiled
    (want, want_grads), (eager_out, eager_grads), (got, got_grads) = results
    assert rel(got, want) < max(2 * rel(eager_out, want), TOL)
    assert got_grads.keys() == eager_grads.keys() == want_grads.keys()
    # Against float32, not against eager bf16: a token-shift vector's gradient (x_r) is a sum of
    # cancelling terms, and the two bf16 paths' summation orders put it 0.062 apart on the H200
    # (2026-12-02) where a fixed bound of 0.06 failed; in float32 the compiled and eager chunked
    # students agree to 3.3e-6 on every gradient. A wrong path (no reset at a document start, the
    # chunked WKV in bf16) moves far more than twice eager's own bf16 error.
    for n, g in got_grads.items():
        assert rel(g, want_grads[n]) < max(2 * rel(eager_grads[n], want_grads[n]), TOL), n
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_float32_weights_under_autocast_on_fla(compiled: bool) -> None:
    """The one-GPU trainer's student (zero0.json: float32 weights, bf16 autocast): w, k, v, a, b
    reach the WKV op as float32 by type promotion and are cast to bf16 for fla inside the layer
    (in its compiled graph under train.compile); the result is as close to the float32 truth as
    a bf16 student's, forward and gradients, packed rows and plain ones."""
    _require_fla()
    import copy

    from shared.compiling import compile_decoder_layers
    from shared.student import convert_teacher
    from shared.tiny import tiny_teacher

    torch._dynamo.reset()
    teacher = tiny_teacher("llama", layers=4, hidden=576, heads=9, kv_heads=3, vocab=512).to(DEV)
    torch.manual_seed(0)
    truth = convert_teacher(teacher, dict(layers=[1, 2, 3], mixer="rwkv7"))  # chunked float32
    bf16 = copy.deepcopy(truth).to(torch.bfloat16)  # the bf16 student: the error it allows
    mixed = copy.deepcopy(truth)
    if compiled:
        assert compile_decoder_layers(mixed.model.layers, "default") == 4
    ids = torch.randint(3, 512, (2, 256), device=DEV)
    positions = torch.stack([torch.cat([torch.arange(n, device=DEV) for n in row])
                             for row in ([70, 33, 100, 53], [1, 200, 55])])
    for position_ids in (None, positions):
        results = []
        for student, autocast in ((truth, False), (bf16, False), (mixed, True)):
            student.train().zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = student(ids, position_ids=position_ids, use_cache=False).logits
            logits.float().pow(2).mean().backward()
            results.append((logits.detach().float(),
                            {n: p.grad.float() for n, p in student.named_parameters()
                             if p.grad is not None}))
        (want, want_grads), (bf16_out, bf16_grads), (got, got_grads) = results
        assert all(p.dtype == torch.float32 for p in mixed.parameters())
        assert rel(got, want) < max(2 * rel(bf16_out, want), TOL)
        assert got_grads.keys() == want_grads.keys()
        for n, g in got_grads.items():
            assert rel(g, want_grads[n]) < max(2 * rel(bf16_grads[n], want_grads[n]), TOL), n
    torch._dynamo.reset()
