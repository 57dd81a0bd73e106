"""The trainer's DeepSpeed settings for bf16 (configs/deepspeed/zero1.json): with ZeRO-1's
per-tensor overflow check off (``bf16.check_grad_overflow``) a step updates the weights exactly
as with it on, and issues no ``isfinite`` per parameter tensor (issue 19: 1,203 of them per
step at the 135M shape, host work that kept the GPU idle).

bf16 runs on the CPU here (the trainer enables it on GPUs only): real DeepSpeed, one rank,
gloo, in a subprocess so that torch.distributed state never leaks into other tests.
"""
from __future__ import annotations

import textwrap

import pytest

from conftest import run_one_rank

SCRIPT = textwrap.dedent("""
    import copy, os
    import torch, deepspeed
    from services.trainer.components import deepspeed_config
    from shared.config import load_config
    from shared.losses import kd_ce_full
    from shared.student import convert_teacher
    from shared.tiny import tiny_teacher

    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(None, ["--train.deepspeed_config", "configs/deepspeed/zero1.json",
                             "--data.micro_batch_size", "2"])
    # the settings the trainer gives DeepSpeed on a GPU
    ds = deepspeed_config(cfg, torch.device("cuda", 0), 1)
    assert ds["bf16"] == {"check_grad_overflow": False, "enabled": True}, ds["bf16"]
    ds["optimizer"]["params"].pop("fused", None)   # torch's fused AdamW: CUDA only here
    torch.manual_seed(0)
    student = convert_teacher(tiny_teacher("llama", layers=2), {"layers": [1], "mixer": "rwkv7"})
    ids = torch.randint(3, 101, (2, 12))
    teacher_logits = torch.randn(2, 12, 101).bfloat16()
    labels = torch.roll(ids, -1, 1)

    def train(check: bool):
        config = copy.deepcopy(ds)
        config["bf16"]["check_grad_overflow"] = check
        model = copy.deepcopy(student)
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
        isfinite = 0
        for _ in range(2):
            logits = engine(input_ids=ids, use_cache=False).logits
            loss, _, _ = kd_ce_full(logits, teacher_logits, labels, kernel="torch")
            engine.backward(loss)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                engine.step()
            isfinite += sum(e.count for e in p.key_averages() if e.key == "aten::isfinite")
        weights = {n: q.detach().clone() for n, q in engine.module.named_parameters()}
        fp32 = [t.detach().clone() for t in engine.optimizer.single_partition_of_fp32_groups]
        return weights, fp32, isfinite

    fast, fast_master, fast_checks = train(False)
    ref, ref_master, ref_checks = train(True)
    tensors = sum(1 for _ in student.parameters())
    assert ref_checks >= 2 * tensors, (ref_checks, tensors)   # the check this config removes
    # left: two on the global norm per step (DeepSpeed's invalid-norm tests), none per tensor
    assert fast_checks <= 2 * 2, fast_checks
    assert all(torch.equal(fast[n], ref[n]) for n in ref)
    assert all(torch.equal(a, b) for a, b in zip(fast_master, ref_master, strict=True))
    assert any(not torch.equal(ref[n], student.state_dict()[n].bfloat16()) for n in ref)
    print("DS-STEP-OK", ref_checks, tensors)
""")


def test_bf16_zero1_step_without_overflow_check_is_the_same_step() -> None:
    pytest.importorskip("deepspeed")
    run_one_rank(SCRIPT, "DS-STEP-OK")
