"""The trainer service on CPU: real DeepSpeed, real Gloo, a real teacher service process,
two trainer ranks under torchrun."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    free_port,
    service_env,
    start_teacher,
    torchrun_workers,
    wait_for,
    write_config,
)


def prepare_dataset(tiny_llama: Path, root: Path, *extra: str) -> Path:
    """A prepared dataset (real text from the system's documentation) in our on-disk format."""
    import glob

    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for path in sorted(glob.glob("/usr/share/doc/*/copyright"))[:200]:
            for para in Path(path).read_text(errors="ignore").split("\n\n"):
                if len(para) > 80:
                    f.write(json.dumps({"text": para}) + "\n")
    subprocess.run([sys.executable, "-m", "services.data", "text", "--paths", str(corpus),
                    "--tokenizer", str(tiny_llama), "--output_dir", str(root / "ds"),
                    "--max_len", "48", "--buckets", "24", "--validation_size", "16",
                    "--max_samples", "600", *extra], cwd=ROOT, env=service_env(), check=True,
                   capture_output=True)
    return root / "ds"


@pytest.fixture(scope="module")
def dataset(tiny_llama, tmp_path_factory) -> Path:
    return prepare_dataset(tiny_llama, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def packed_dataset(tiny_llama, tmp_path_factory) -> Path:
    """Several documents per row, position ids restarting at each (``--pack``)."""
    return prepare_dataset(tiny_llama, tmp_path_factory.mktemp("packed"), "--pack")


def stack_config(tmp_path: Path, model: Path, data: Path, rdv: Path, **train) -> Path:
    return write_config(tmp_path / "train.yaml", {
        "teacher": {"model_path": str(model), "metrics_port": free_port()},
        "link": {"rendezvous_dir": str(rdv), "trainers_per_group": 2, "timeout_seconds": 60},
        "student": {"layers": [1, 2], "mixer": "rwkv6"},
        "data": {"train_dir": str(data), "micro_batch_size": 2, "max_len": 48},
        "train": {"steps": 30, "lr_init": 2e-3, "lr_final": 1e-4, "warmup_steps": 3,
                  "output_dir": str(tmp_path / "run"), "checkpoint_every": 100,
                  "val_every": 0, "metrics_port": free_port(), **train},
    })


def torchrun(config: Path, *extra: str, nnodes: int = 1, node_rank: int = 0,
             master_port: int | None = None, log: Path | None = None,
             max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--max-restarts", str(max_restarts),
           "--master-addr", "127.0.0.1", "--master-port", str(master_port or free_port()),
           "-m", "services.trainer", "--config", str(config), *extra]
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=service_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def steps(run_dir: Path, rank: int = 0) -> dict[int, dict]:
    """Last record of each step (a resumed run appends the steps it repeats)."""
    lines = (run_dir / f"steps-rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def kill_job(config: Path) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(config).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture
def teacher(tmp_path, tiny_llama):
    procs = []

    def start(config: Path, group: int = 0):
        procs.append(start_teacher(config, group, tmp_path / f"teacher{group}.log"))
        return procs[-1]

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def run_to_end(proc: subprocess.Popen, timeout: float = 400, log: Path | None = None) -> str:
    """The job's output (from ``log`` where it went to a file), once it ended well."""
    out, _ = proc.communicate(timeout=timeout)
    out = log.read_text(errors="replace") if log else out
    assert proc.returncode == 0, out[-4000:]
    return out


def run_jobs_to_end(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 400) -> None:
    """Wait for several torchrun jobs (simulated nodes) at once. The first to fail or the
    deadline stops them all, and the error shows every log: a node whose job failed leaves
    the other node's ranks waiting in a collective until the process group times out, and
    the log that says why is the failed node's, not the waiting one's."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.5)
    if any(p.returncode != 0 for p in procs):
        tails = "\n".join(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-3000:]}"
                          for log in logs if log.is_file())
        codes = [p.returncode for p in procs]
        raise AssertionError(f"jobs ended with {codes} (timeout {timeout:.0f} s)\n{tails}")


@pytest.mark.parametrize("stage,zero,packed", [("align", "zero1", False), ("kd", "zero3", False),
                                               ("sft", "zero2", False), ("kd", "zero3", True)])
def test_stage_loss_falls(stage, zero, packed, tmp_path, tiny_llama, request, teacher):
    # packed: student layers run per document under ZeRO-3, position ids travel to the teacher
    data = request.getfixturevalue("packed_dataset" if packed else "dataset")
    cfg = stack_config(tmp_path, tiny_llama, data, tmp_path / "rdv", stage=stage,
                       deepspeed_config=f"configs/deepspeed/{zero}.json",
                       kl_weight=1.0, ce_weight=0.0, val_every=15 if packed else 0,
                       slow_step_seconds=0.01 if stage == "sft" else 0,   # every step is slow
                       skip_eos_targets=stage == "sft")   # the text dataset's end token
    if stage != "sft":
        teacher(cfg)
    log = tmp_path / "trainer.log"   # a file: a pipe read only at the end fills with stacks
    proc = torchrun(cfg, log=log)
    port = __import__("yaml").safe_load(cfg.read_text())["train"]["metrics_port"]
    scraped = []

    def scrape() -> bool:
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return proc.poll() is not None
        value = [ln for ln in text.splitlines() if ln.startswith("distill_trainer_steps_total")]
        scraped.append(float(value[0].rsplit(" ", 1)[1]))
        return scraped[-1] >= 10 or proc.poll() is not None

    wait_for(scrape, 300, "trainer metrics over HTTP")
    out = run_to_end(proc, log=log)
    records = steps(tmp_path / "run")
    assert sorted(records) == list(range(1, 31))
    # train.slow_step_seconds: a step past it printed the stacks it was in (not the first step)
    dumped = "the stacks it is in" in out and "in train_step" in out
    assert dumped == (stage == "sft"), out[-3000:]
    skipping = "train.skip_eos_targets: positions predicting token" in out
    assert skipping == (stage == "sft"), out[-3000:]
    key = {"align": "align", "kd": "kl", "sft": "ce"}[stage]
    first = sum(records[s][key] for s in range(1, 6)) / 5
    last = sum(records[s][key] for s in range(26, 31)) / 5
    assert last < first * (0.9 if stage != "sft" else 0.97), (first, last)
    assert scraped and max(scraped) >= 10   # the run's steps, seen over HTTP
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert Path(summary["student"], "config.json").is_file()
    startup = summary["startup_seconds"]   # services/trainer/startup.py, in the order they ran
    assert list(startup) == ["process start and imports", "input checks", "process group",
                             "teacher", "student", "DeepSpeed engine", "data and resume",
                             "first step"], startup
    assert all(v >= 0 for v in startup.values()) and startup["process start and imports"] > 0.5
    if packed:  # validation on packed rows, through the teacher link with position ids
        val = summary["history"]["last_val"]
        assert val["tokens"] > 0, val
        assert all(0 < val[k] < 20 for k in ("kl", "student_loss", "teacher_loss")), val
    if stage == "kd":
        # async prefetch: the teacher computed micro step k+1 while step k was training
        overlapped = 0
        for s in range(2, 31):
            (f0, f1), = records[s]["teacher_forward"]
            prev = records[s - 1]
            overlapped += min(f1, prev["end"]) - max(f0, prev["start"]) > 0
        assert overlapped >= 20, overlapped


def test_kill_and_resume_is_bit_exact(tmp_path, tiny_llama, dataset, packed_dataset, teacher):
    """Killed mid-run and resumed, a job trains exactly the steps one run would, on two datasets
    mixed 3 : 1 (data.mix_dirs: each dataset's sampler and the mix's draws resume)."""
    base = dict(stage="kd", steps=40, checkpoint_every=5, ce_weight=0.5,
                deepspeed_config="configs/deepspeed/zero1.json")
    mix = ("--data.mix_dirs", str(packed_dataset), "--data.mix_weights", "3,1")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    ref_cfg = stack_config(ref_dir, tiny_llama, dataset, tmp_path / "rdv", **base)
    teacher(ref_cfg)
    out = run_to_end(torchrun(ref_cfg, *mix))
    assert "data: 2 datasets mixed, shares 0.75, 0.25" in out, out[-3000:]
    cut_cfg = stack_config(cut_dir, tiny_llama, dataset, tmp_path / "rdv", **base)
    proc = torchrun(cut_cfg, *mix, log=tmp_path / "cut.log")
    latest = cut_dir / "run" / "checkpoints" / "latest"
    wait_for(latest.is_file, 300, "the first checkpoint")
    kill_job(cut_cfg)                       # the whole job dies, no clean shutdown
    proc.wait()
    killed_at = max(steps(cut_dir / "run"))
    assert killed_at < 40, "the job finished before it could be killed"
    # a checkpoint interrupted mid-write must never be taken
    resume_step = int(latest.read_text().split("-")[1])
    partial = cut_dir / "run" / "checkpoints" / f".partial-step-{resume_step + 5}"
    partial.mkdir(exist_ok=True)
    (partial / "garbage").write_text("half written")
    out = run_to_end(torchrun(cut_cfg, *mix))
    assert f"at step {resume_step}" in out, out[-3000:]
    ref, cut = steps(ref_dir / "run"), steps(cut_dir / "run")
    assert sorted(cut) == list(range(1, 41))
    for s in range(resume_step + 1, 41):   # the steps after the resume point, bit for bit
        for key in ("total", "kl", "ce", "lr", "grad_norm"):
            assert cut[s][key] == ref[s][key], (s, key, cut[s][key], ref[s][key])
    # the summary counts every step once, those before the resume too
    ref_sum, cut_sum = (json.loads((d / "run" / "summary.json").read_text())
                        for d in (ref_dir, cut_dir))
    ranks = len(list((ref_dir / "run").glob("steps-rank*.jsonl")))
    every = sum(r["tokens"] for rank in range(ranks) for r in steps(ref_dir / "run", rank).values())
    assert cut_sum["tokens"] == ref_sum["tokens"] == every > 0, (cut_sum, ref_sum, every)


def test_two_simulated_nodes_train_one_model(tmp_path, tiny_llama, dataset, teacher):
    configs = two_nodes(tmp_path, tiny_llama, dataset, teacher, steps=4)
    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [torchrun(c, nnodes=2, node_rank=n, master_port=port, log=log)
             for n, (c, log) in enumerate(zip(configs, logs, strict=True))]
    run_jobs_to_end(procs, logs + [tmp_path / "teacher0.log", tmp_path / "teacher1.log"])
    out = logs[0].read_text()
    assert "4 ranks" in out, out[-2000:]
    for rank in range(4):
        assert sorted(steps(tmp_path / "run", rank)) == [1, 2, 3, 4]
    # both teachers served: each group's rendezvous saw its trainers
    assert (tmp_path / "rdv-node0" / "group-0" / "manifest.json").is_file()
    assert (tmp_path / "rdv-node1" / "group-1" / "manifest.json").is_file()
    # one model: every rank saw the same loss-independent learning rate and grad norm
    norms = {steps(tmp_path / "run", r)[4]["grad_norm"] for r in range(4)}
    assert len(norms) == 1, norms


def two_nodes(tmp_path: Path, tiny_llama: Path, dataset: Path, teacher, **train) -> list[Path]:
    """Configs of two simulated nodes: each its own rendezvous volume and teacher (group 0 on
    node 0, group 1 on node 1: global ranks 0-1 and 2-3), one output directory."""
    import yaml

    cfg = stack_config(tmp_path, tiny_llama, dataset, tmp_path / "rdv-node0", stage="kd",
                       deepspeed_config="configs/deepspeed/zero2.json", **train)
    data1 = yaml.safe_load(cfg.read_text())
    data1["link"]["rendezvous_dir"] = str(tmp_path / "rdv-node1")
    node1 = write_config(tmp_path / "node1.yaml", data1)
    teacher(cfg, 0)
    teacher(node1, 1)
    return [cfg, node1]


def test_a_stopped_rank_on_one_node_restarts_both_nodes(tmp_path, tiny_llama, dataset, teacher):
    # SIGSTOP of a rank on node 1: no socket closes, so no collective fails and neither
    # torchrun notices; without the peer watch every rank would wait in the step's all-reduce
    # for the process group's 30 minutes. Its ring watcher (rank 2) finds it silent within
    # train.peer_timeout_seconds and tells all ranks, they leave, both torchruns restart their
    # ranks (node 1's kills the stopped one), and the job resumes from the checkpoint.
    configs = two_nodes(tmp_path, tiny_llama, dataset, teacher, steps=40, checkpoint_every=5,
                        peer_timeout_seconds=10)
    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [torchrun(c, nnodes=2, node_rank=n, master_port=port, log=log, max_restarts=1)
             for n, (c, log) in enumerate(zip(configs, logs, strict=True))]
    wait_for((tmp_path / "run" / "checkpoints" / "latest").is_file, 300, "the first checkpoint")
    rank3 = torchrun_workers(procs[1].pid).get(3)   # node 1's torchrun is the agent itself
    assert rank3, "rank 3's process not found"
    os.kill(rank3, signal.SIGSTOP)
    stopped_at = max(steps(tmp_path / "run", 3))
    run_jobs_to_end(procs, logs + [tmp_path / "teacher0.log", tmp_path / "teacher1.log"])
    assert stopped_at < 40, "the job finished before rank 3 could be stopped"
    for log in logs:
        assert "trainer rank 3 of 4" in log.read_text() and "sent no heartbeat" in log.read_text()
    for rank in range(4):
        assert sorted(steps(tmp_path / "run", rank)) == list(range(1, 41)), rank
    norms = {steps(tmp_path / "run", r)[40]["grad_norm"] for r in range(4)}
    assert len(norms) == 1, norms


def test_a_rank_failing_on_its_way_in_ends_the_other_node_at_once(tmp_path, tiny_llama, dataset,
                                                                  teacher):
    # node 1's ranks stop at a bad flag before they join the process group; node 0's ranks,
    # already waiting in init_process_group, must not wait there for 30 minutes
    configs = two_nodes(tmp_path, tiny_llama, dataset, teacher, steps=4)
    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    node0 = torchrun(configs[0], nnodes=2, node_rank=0, master_port=port, log=logs[0])
    node1 = torchrun(configs[1], "--train.steps", "many", nnodes=2, node_rank=1,
                     master_port=port, log=logs[1])
    for proc, log in zip((node1, node0), logs[::-1], strict=True):
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{log.name} still running:\n{log.read_text()[-3000:]}") from None
    assert node0.returncode != 0 and node1.returncode != 0
    out = logs[0].read_text()
    assert re.search(r"trainer rank [23] \(.*\) failed: ConfigError", out), out[-3000:]
    assert "train.steps: expected an integer, got 'many'" in out, out[-3000:]


def test_train_device_cuda_without_a_gpu_is_a_clear_error():
    import torch

    from services.trainer.components import init_distributed
    from shared.config import load_config

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (checks the error a CPU machine gives)")
    with pytest.raises(RuntimeError, match="train.device=cuda but no CUDA device is visible"):
        init_distributed(load_config(None, ["--train.device", "cuda"]))
