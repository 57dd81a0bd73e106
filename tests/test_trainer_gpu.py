"""The trainer's step on a GPU: no host sync of ours between micro steps.

Runs tests/sync_probe.py (torch's sync debug mode) at 1 and at 4 micro steps per optimizer
step: a sync site of the trainer (services/trainer/) whose count grows with the micro steps
drains the GPU between them. Every site found is printed (``pytest -rP`` shows them): the
ones in DeepSpeed, transformers and the student are listed in the trainer's train_step.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, service_env
from shared.flops import peak_flops
from test_trainer import dataset, stack_config  # noqa: F401 - dataset is a fixture

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def probe(tmp_path: Path, config: Path, grad_accum: int) -> dict[str, int]:
    out = tmp_path / f"syncs-{grad_accum}.json"
    done = subprocess.run([sys.executable, "tests/sync_probe.py", str(out), "--config",
                           str(config), "--train.grad_accum", str(grad_accum),
                           "--train.output_dir", str(tmp_path / f"run-{grad_accum}")],
                          cwd=ROOT, env=one_process_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def one_process_env() -> dict[str, str]:
    """The service environment without a launcher's variables: a world of one."""
    return {k: v for k, v in service_env().items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


@pytest.mark.parametrize("stage", ["sft", "kd"])
def test_no_host_sync_of_the_trainer_between_micro_steps(stage, tmp_path, tiny_llama,
                                                         dataset):  # noqa: F811
    cfg = stack_config(tmp_path, tiny_llama, dataset, tmp_path / "rdv", stage=stage,
                       device="cuda", metrics_port=0, save_at_end=False)
    sections = yaml.safe_load(cfg.read_text())
    sections["link"].update(mode="in_process", trainers_per_group=1)  # kd: the teacher here
    cfg.write_text(yaml.safe_dump(sections))
    one, four = probe(tmp_path, cfg, 1), probe(tmp_path, cfg, 4)
    print(f"\n{stage}: host syncs in 2 optimizer steps (1 / 4 micro steps each):")
    for where in sorted(set(one) | set(four)):
        print(f"  {one.get(where, 0):3d} / {four.get(where, 0):3d}  {where}")
    grew = {where: (one.get(where, 0), n) for where, n in four.items()
            if n > one.get(where, 0) and where.startswith("services/trainer/")}
    assert not grew, f"trainer syncs per micro step (1 / 4 micro steps): {grew}"
    # the same runs report their efficiency: MFU on a card with a known peak
    records = [json.loads(line) for line in
               (tmp_path / "run-4" / "steps-rank0.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_second"] > 0 and r["flops"] > 0 for r in records)
    if peak_flops("cuda") is not None:
        assert all(0 < r["mfu"] < 1 for r in records), [r["mfu"] for r in records]


def test_the_stage0_autocast_engine_trains_validates_and_exports(tmp_path, tiny_llama,
                                                                 dataset):  # noqa: F811
    """configs/deepspeed/zero0.json on a GPU (fp32 weights under bf16 autocast, the gradients
    clipped in train_step) with compiled layers: a kd stage with validation and an export that
    generates; its first step's losses and gradient norm near an eager ZeRO-1 bf16 run's (the
    same weights and batch; bf16 weights against fp32 ones under autocast: a few per cent).
    The reference runs eager: two compiled stages took over 100 s on the H200. The teacher's
    heads are 64 wide, a head size whose fla configs ship (shared/student/ops/fla_configs):
    tiny_llama's 16-wide heads autotuned every RWKV-7 kernel in both runs, and three device
    calls ended before the test did."""
    from shared.student import load_student
    from shared.tiny import make_tiny_llama

    teacher = make_tiny_llama(tmp_path / "teacher", hidden_size=128, heads=2, kv_heads=1,
                              tokenizer_from=tiny_llama)  # the dataset's tokenizer
    records = {}
    for ds in ("zero1", "zero0"):
        (tmp_path / ds).mkdir()
        cfg = stack_config(tmp_path / ds, teacher, dataset, tmp_path / "rdv", stage="kd",
                           device="cuda", metrics_port=0, steps=6, val_every=3,
                           deepspeed_config=f"configs/deepspeed/{ds}.json",
                           compile="default" if ds == "zero0" else "off")
        sections = yaml.safe_load(cfg.read_text())
        sections["link"].update(mode="in_process", trainers_per_group=1)
        sections["student"].update(mixer="rwkv7", mode="block")
        cfg.write_text(yaml.safe_dump(sections))
        done = subprocess.run([sys.executable, "-m", "services.trainer", "--config", str(cfg)],
                              cwd=ROOT, env=one_process_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        run = tmp_path / ds / "run"
        records[ds] = [json.loads(line) for line in
                       (run / "steps-rank0.jsonl").read_text().splitlines()]
        summary = json.loads((run / "summary.json").read_text())
        val = summary["history"]["last_val"]
        assert all(0 < val[k] < 20 for k in ("kl", "student_loss")), val
    zero0, zero1 = records["zero0"], records["zero1"]
    assert [r["step"] for r in zero0] == list(range(1, 7))
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in zero0), zero0
    for key in ("total", "grad_norm"):
        assert abs(zero0[0][key] - zero1[0][key]) <= 0.05 * abs(zero1[0][key]), \
            (key, zero0[0][key], zero1[0][key])
    student = load_student(summary["student"]).cuda()
    ids = torch.tensor([[5, 6, 7, 8]], device="cuda")
    out = student.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
