"""The student under DeepSpeed ZeRO-3 (CPU, one rank, gloo): built inside zero.Init, then an
align step and a full step with the per-layer non-reentrant gradient checkpointing switch.

Runs in a subprocess so that torch.distributed state never leaks into other tests.
"""
from __future__ import annotations

import textwrap

import pytest

from conftest import run_one_rank

SCRIPT = textwrap.dedent("""
    import torch, deepspeed
    # as the trainer does (services/trainer/components.py init_distributed): no probe of every
    # op (compiler runs) and no JIT build of the shared-memory all-reduce, which training never
    # uses. That build was most of this test's time on a fresh CI machine (100 s of 120 s here,
    # over the 300 s limit there), and its lock file, left by a killed build, hangs it forever.
    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from transformers import initialization as hf_init
    import shared.student as S
    from shared.tiny import tiny_teacher

    torch.manual_seed(0)
    spec = dict(layers=[0, 2], mixer="rwkv7", ffn="rwkv_cmix")
    student = S.convert_teacher(tiny_teacher("llama"), spec).eval()
    ids = torch.randint(3, 101, (2, 9))
    expected = student(ids).logits
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    # what from_pretrained does under ZeRO-3: build partitioned, skip the init, then load weights
    with deepspeed.zero.Init(config_dict_or_path=cfg), hf_init.no_init_weights():
        model = S.RWKVHybridForCausalLM(student.config)
    for (name, p), (ref_name, q) in zip(model.named_parameters(), student.named_parameters()):
        assert name == ref_name and p.numel() == 0, name  # partitioned
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(q.data)
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=list(model.parameters()))
    engine.eval()
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, expected)
    engine.train()
    out = engine.module.align_forward({0: torch.randn(2, 9, 64), 2: torch.randn(2, 9, 64)})
    engine.backward(sum(o.pow(2).mean() for o in out.values()))
    engine.step()
    model.config.rwkv_gradient_checkpointing = True
    loss = engine(ids, labels=ids, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    print("ZERO3-OK")
""")


def test_zero3_align_and_full_step_on_cpu() -> None:
    pytest.importorskip("deepspeed")
    run_one_rank(SCRIPT, "ZERO3-OK")
