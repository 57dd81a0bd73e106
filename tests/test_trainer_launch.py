"""How the trainer is started and how it ends: one process without a launcher (a world of
one), a half-set launch environment, and torchrun's failure summary showing our error line.
Real processes, real DeepSpeed and Gloo, a real tiny teacher (tests/test_trainer.py's
fixtures)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port, service_env, write_config
from test_trainer import dataset, stack_config, steps  # noqa: F401 - dataset is a fixture

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TORCHELASTIC_ERROR_FILE")


def bare_env(**extra: str) -> dict[str, str]:
    """The service environment without any launcher's variables."""
    env = {k: v for k, v in service_env().items() if k not in LAUNCH}
    env.update(extra)
    return env


def trainer(config: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.trainer", "--config", str(config),
                           *args], cwd=ROOT, env=env or bare_env(), capture_output=True,
                          text=True, timeout=timeout)


def in_process_config(tmp_path: Path, model: Path, data: Path) -> Path:
    cfg = stack_config(tmp_path, model, data, tmp_path / "rdv", stage="kd", steps=3,
                       deepspeed_config="configs/deepspeed/zero1.json")
    sections = __import__("yaml").safe_load(cfg.read_text())
    sections["link"].update(mode="in_process", trainers_per_group=1)
    return write_config(cfg, sections)


def test_a_world_of_one_trains_without_torchrun(tmp_path, tiny_llama, dataset):  # noqa: F811
    cfg = in_process_config(tmp_path, tiny_llama, dataset)
    done = trainer(cfg)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "1 ranks" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_per_second"] > 0
    assert Path(summary["student"], "config.json").is_file()
    records = [json.loads(line) for line in (run / "steps-rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["tokens_per_second"] == r["tokens"] / r["seconds"]
        assert r["flops"] > 0 and r["teacher_flops"] > 0   # the teacher runs in this process
    # a CPU has no datasheet peak: MFU is absent everywhere, not 0
    assert "mfu" not in summary and all("mfu" not in r for r in records)
    progress = [line for line in out.splitlines() if "step 3/3" in line]
    assert progress and "tok/s" in progress[0] and "MFU" not in progress[0], progress


def test_a_half_set_launch_environment_is_a_one_line_error(tmp_path, tiny_llama):
    cfg = write_config(tmp_path / "c.yaml", {"teacher": {"model_path": str(tiny_llama)}})
    done = trainer(cfg, env=bare_env(RANK="0"), timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in done.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stdout[-2000:]
    assert errors[0].endswith("launch environment: RANK set but WORLD_SIZE, LOCAL_RANK not; "
                              "start the trainer with torchrun (it sets all of RANK, "
                              "WORLD_SIZE, LOCAL_RANK), or unset RANK to run one process alone")


def torchrun_failure(config: Path, *args: str) -> tuple[int, str]:
    """Exit status and output of a 2-rank torchrun job expected to fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "services.trainer", "--config", str(config), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=bare_env(), capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout + done.stderr


def root_cause(output: str) -> str:
    """torchrun's failure summary from its root cause on: the last screen of a failed job."""
    marker = "Root Cause (first observed failure):"
    assert marker in output, output[-4000:]
    return output[output.rindex(marker):]


def test_torchruns_summary_shows_a_config_error(tmp_path, tiny_llama, dataset):  # noqa: F811
    cfg = stack_config(tmp_path, tiny_llama, dataset, tmp_path / "rdv")
    status, out = torchrun_failure(cfg, "--train.lr_init", "-1.0")
    assert status != 0
    cause = root_cause(out)
    assert "traceback : command line: train.lr_init: -1.0 must be > 0" in cause, cause
    assert "exitcode  : 2" in cause and "error_file: <N/A>" not in cause, cause


def test_torchruns_summary_shows_a_missing_teacher(tmp_path, tiny_llama, dataset):  # noqa: F811
    cfg = stack_config(tmp_path, tmp_path / "no-such-teacher", dataset, tmp_path / "rdv")
    status, out = torchrun_failure(cfg)
    assert status != 0
    cause = root_cause(out)
    assert (f"traceback : FileNotFoundError: teacher.model_path='{tmp_path / 'no-such-teacher'}'"
            " does not exist") in cause, cause
    assert "exitcode  : 1" in cause, cause



def test_a_time_limit_ends_the_stage_with_an_export(tmp_path, tiny_llama, dataset):  # noqa: F811
    """train.time_limit_seconds: the first step past the limit is the last; the stage still
    checkpoints, exports and writes its summary (a benchmark or a demo can bound a stage)."""
    cfg = in_process_config(tmp_path, tiny_llama, dataset)
    done = trainer(cfg, "--train.steps", "100000", "--train.time_limit_seconds", "0.01")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1, summary   # the first step already ends past 10 ms
    assert Path(summary["student"], "config.json").is_file()
    assert "train.time_limit_seconds=0.01 reached: step 1 is the last" in out


def test_a_time_schedule_decays_by_the_time_limit_and_a_resume_keeps_its_budget(
        tmp_path, tiny_llama, dataset):  # noqa: F811
    """train.lr_schedule: time: a stage its time limit ends has decayed to lr_final (with the
    step schedule of 100,000 steps it would barely have left lr_init), and a resumed stage
    goes on with the time its checkpoint had left, not a fresh budget."""
    cfg = in_process_config(tmp_path, tiny_llama, dataset)
    args = ["--train.steps", "100000", "--train.time_limit_seconds", "4",
            "--train.lr_schedule", "time", "--train.warmup_steps", "0",
            "--train.lr_init", "1e-3", "--train.lr_final", "1e-5"]
    done = trainer(cfg, *args)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "steps-rank0.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records]
    assert len(lrs) >= 3, lrs  # a tiny step takes well under a second on CPU
    assert lrs[0] == 1e-3 and all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    # the last step's lr comes from the share spent after the one before it: near the end
    assert lrs[-1] < 1e-5 + 0.5 * (1e-3 - 1e-5), lrs  # steps schedule: ~1e-3 still
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["trained_seconds"] >= 4.0, state
    steps = len(records)
    again = trainer(cfg, *args)  # resumes from the last checkpoint: no time left but one step
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "resumed from" in out and f"step {steps + 1} is the last" in out, out[-3000:]
    bad = trainer(cfg, "--train.lr_schedule", "time")  # no time limit to decay over
    assert bad.returncode != 0
    assert "train.lr_schedule: time decays the learning rate over train.time_limit_seconds" \
        in bad.stdout + bad.stderr


def test_an_exports_tokenizer_loads_without_transformers_fallback(tmp_path) -> None:
    """A stage started from an export (student.init_from) reads the export's tokenizer in a fresh
    process: before shared.student registered rwkv_hybrid there, transformers fell back to a bare
    config and logged its "model of type" warning on every such stage."""
    from transformers import AutoTokenizer

    from shared.student import convert_teacher, save_student
    from shared.tiny import tiny_teacher, train_tokenizer

    train_tokenizer(tmp_path / "tok", vocab_size=300, max_bytes=50_000)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    student = convert_teacher(tiny_teacher("llama", vocab=len(tokenizer)),
                              dict(layers=[0], mixer="rwkv7", mode="block"))
    export = save_student(student, tokenizer, tmp_path / "export")
    code = ("import sys; from services.trainer.inputs import load_tokenizer; "
            "print(len(load_tokenizer(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(export)], cwd=ROOT, env=bare_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(len(tokenizer))
    assert "to instantiate a model of type" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_the_stage0_engine_trains_as_zero1_does_and_resumes(tmp_path, tiny_llama,
                                                            dataset):  # noqa: F811
    """configs/deepspeed/zero0.json (fp32 weights, bf16 autocast on a GPU): DeepSpeed's stage 0
    with the gradients clipped in train_step (foreach) and no all-reduce in a world of one.
    On the CPU both engines are fp32, so with a clip that binds (grad_clip 0.01) and two micro
    steps per step, every step's losses and gradient norm match ZeRO-1's; the zero0 run is cut
    after 3 steps and resumed from its checkpoint to 5."""
    common = ["--train.grad_clip", "0.01", "--train.grad_accum", "2", "--train.lr_init", "1e-3",
              "--train.lr_final", "1e-3", "--train.warmup_steps", "0",
              "--train.checkpoint_every", "1"]   # a flat lr: the cut run's schedule is the same
    runs = {}
    for name, ds, cuts in (("zero1", "zero1", [5]), ("zero0", "zero0", [3, 5])):
        (tmp_path / name).mkdir()
        cfg = in_process_config(tmp_path / name, tiny_llama, dataset)
        for n in cuts:
            done = trainer(cfg, *common, "--train.steps", str(n),
                           "--train.deepspeed_config", f"configs/deepspeed/{ds}.json")
            assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        runs[name] = steps(tmp_path / name / "run")
    assert "at step 3" in done.stdout + done.stderr   # the second zero0 run resumed
    assert sorted(runs["zero0"]) == sorted(runs["zero1"]) == [1, 2, 3, 4, 5]
    for s in range(1, 6):
        ref, got = runs["zero1"][s], runs["zero0"][s]
        assert ref["grad_norm"] > 0.01, ref   # the clip binds: a wrong clip shows in the losses
        for key in ("total", "kl", "ce", "grad_norm"):
            assert abs(got[key] - ref[key]) <= 1e-4 * abs(ref[key]), (s, key, got[key], ref[key])
