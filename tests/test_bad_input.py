"""Bad input (issue 11 item 5): each case is a clear error that names the problem and the
fix, a non-zero exit within seconds (never a hang), and nothing corrupted.

One parametrised test runs the real service on one bad input: the trainer as torchrun starts
a rank (``python -m services.trainer``, one rank, Gloo), or the teacher service. The checks
below the services have their own tests, which stay: tests/test_config.py (key errors of
the schema), tests/test_link.py::test_handshake_refusals (the link's vocabulary, tokenizer,
group-size refusals between bare link clients), tests/test_data_loader.py (fingerprint). Here
each must reach the user through the service, as one line.

The time a case took is printed; the bound asserted is only the hang guard (HANG_SECONDS).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, service_env, start_teacher, wait_healthy, write_config
from test_trainer import prepare_dataset

HANG_SECONDS = 60   # a case that has not exited by then hangs


@dataclass
class Run:
    """One case: the service's command line, and what it must say."""

    service: str                            # "trainer" or "teacher"
    config: Path
    args: list[str] = field(default_factory=list)
    problem: str = ""
    fix: str = ""
    untouched: list[Path] = field(default_factory=list)   # must not change
    absent: list[Path] = field(default_factory=list)      # must not be created
    after: Callable[[], None] | None = None               # more checks once it exited


class World:
    """The inputs the cases break, made once per module, and the teachers they run."""

    def __init__(self, tiny_llama: Path, root: Path) -> None:
        self.tiny, self.root = tiny_llama, root
        (root / "good").mkdir(parents=True)
        self.data = prepare_dataset(tiny_llama, root / "good")
        self.teachers: list[subprocess.Popen] = []
        self.closers: list[Callable[[], None]] = []
        # A finished run with two checkpoints (for the damaged-checkpoint case).
        self.checkpointed = root / "checkpointed"
        cfg = self.config(self.checkpointed, train={"stage": "sft", "steps": 2,
                                                    "checkpoint_every": 1})
        done = subprocess.run([sys.executable, "-m", "services.trainer", "--config", str(cfg)],
                              cwd=ROOT, env=rank_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def config(self, case: Path, **sections) -> Path:
        base = {
            "teacher": {"model_path": str(self.tiny), "metrics_port": 0},
            "link": {"rendezvous_dir": str(case / "rdv"), "trainers_per_group": 1,
                     "timeout_seconds": 4, "heartbeat_seconds": 0.5},
            "student": {"layers": [1, 2]},
            "data": {"train_dir": str(self.data), "micro_batch_size": 2},
            "train": {"stage": "kd", "steps": 2, "output_dir": str(case / "run"),
                      "metrics_port": 0, "val_every": 0, "checkpoint_every": 100},
        }
        for name, values in sections.items():
            base[name].update(values)
        case.mkdir(parents=True, exist_ok=True)
        return write_config(case / "config.yaml", base)

    def teacher(self, config: Path, group: int = 0) -> subprocess.Popen:
        """A running, healthy teacher for ``config`` (stopped at the end of the module)."""
        doc = yaml.safe_load(config.read_text())
        doc["teacher"]["metrics_port"] = port = free_port()
        served = write_config(config.with_name(f"teacher-{port}.yaml"), doc)
        proc = start_teacher(served, group, config.parent / f"teacher-{port}.log")
        self.teachers.append(proc)
        wait_healthy(port, proc)
        return proc

    def model(self, name: str, **kwargs) -> Path:
        """Another tiny Llama (same tokenizer unless it gets its own)."""
        from shared.tiny import make_tiny_llama

        path = self.root / name
        if not (path / "config.json").is_file():
            kwargs.setdefault("tokenizer_from", self.tiny)
            make_tiny_llama(path, **kwargs)
        return path

    def other_tokenizer(self) -> tuple[Path, Path]:
        """A model with a tokenizer of its own, and a dataset prepared with it."""
        model = self.model("other-tokenizer", vocab_size=300, tokenizer_from=None)
        data = self.root / "other-data" / "ds"
        if not data.is_dir():
            data.parent.mkdir(parents=True, exist_ok=True)
            prepare_dataset(model, data.parent)
        return model, data

    def stop(self) -> None:
        for proc in self.teachers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        for close in self.closers:
            close()


@pytest.fixture(scope="module")
def world(tiny_llama, tmp_path_factory):
    w = World(tiny_llama, tmp_path_factory.mktemp("bad-input"))
    yield w
    w.stop()


def rank_env() -> dict[str, str]:
    """The environment of rank 0 of one, as torchrun would start it."""
    return dict(service_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``paths``."""
    found = {}
    for root in paths:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                found[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns)
    return found


# --------------------------------------------------------------------------- the cases
def vocabulary(w: World, case: Path) -> Run:
    """A student exported from a teacher with another vocabulary (same tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.student import convert_teacher, save_student

    other = w.model("vocab-640", model_vocab_size=640)
    student = w.root / "student-640"
    if not (student / "config.json").is_file():
        teacher = AutoModelForCausalLM.from_pretrained(str(other))
        save_student(convert_teacher(teacher, {"layers": [1, 2]}),
                     AutoTokenizer.from_pretrained(str(other)), student)
    cfg = w.config(case, student={"init_from": str(student)})
    return Run("trainer", cfg, problem="has a vocabulary of 640 entries, the teacher",
               fix="use a student.init_from exported from this teacher", absent=[case / "run"])


def tokenizer(w: World, case: Path) -> Run:
    """Trainer (and its data) on another tokenizer than the teacher it joins."""
    other, data = w.other_tokenizer()
    served = w.config(case)
    w.teacher(served)
    cfg = w.config(case / "trainer", teacher={"model_path": str(other)},
                   data={"train_dir": str(data)}, link={"rendezvous_dir": str(case / "rdv")})
    return Run("trainer", cfg, problem="tokenizer fingerprint differs",
               fix="must use the same tokenizer", absent=[case / "trainer" / "run"])


def dataset_tokenizer(w: World, case: Path) -> Run:
    _, data = w.other_tokenizer()
    cfg = w.config(case, data={"train_dir": str(data)})
    return Run("trainer", cfg, problem="was tokenised with tokenizer fingerprint",
               fix="re-run the data command with --tokenizer", absent=[case / "run"])


def too_long(w: World, case: Path) -> Run:
    """Sequences of 48 tokens for a teacher of 32 positions."""
    short = w.model("positions-32", max_position_embeddings=32)
    cfg = w.config(case, teacher={"model_path": str(short)})
    return Run("trainer", cfg, problem="longer than the teacher's limit of 32 positions",
               fix="--max_len 32", absent=[case / "run"])


def token_id(w: World, case: Path) -> Run:
    """A dataset whose rows hold an id past the vocabulary (changed after preparation)."""
    import datasets

    data = case / "ds"
    shutil.copytree(w.data, data)
    card = json.loads((data / "card.json").read_text())
    for bucket in card["splits"]["train"]["buckets"]:
        if not bucket["path"]:
            continue
        path = data / bucket["path"]
        edited = datasets.load_from_disk(str(path)).map(
            lambda row: {"input_ids": [700] + row["input_ids"][1:]})
        edited.save_to_disk(str(path) + ".new")
        shutil.rmtree(path)
        os.replace(str(path) + ".new", path)
    cfg = w.config(case, data={"train_dir": str(data)}, train={"stage": "sft"})
    return Run("trainer", cfg, problem="token id 700 in dataset",
               fix="prepare it again", untouched=[data])


def model_missing(w: World, case: Path) -> Run:
    cfg = w.config(case, teacher={"model_path": str(case / "nothing-here")})
    return Run("trainer", cfg, problem="does not exist",
               fix="point it at a local Hugging Face model directory", absent=[case / "run"])


def not_a_model(w: World, case: Path) -> Run:
    cfg = w.config(case, teacher={"model_path": str(w.data)})
    return Run("teacher", cfg, problem="is not a Hugging Face model directory (no config.json)",
               fix="point it at a local checkpoint", untouched=[w.data])


def unknown_key(w: World, case: Path) -> Run:
    return Run("teacher", w.config(case), ["--teacher.max_batch_tokenz", "8"],
               problem="unknown key 'teacher.max_batch_tokenz'", fix="keys of 'teacher'")


def ill_typed_key(w: World, case: Path) -> Run:
    return Run("trainer", w.config(case), ["--train.steps", "many"],
               problem="train.steps: expected an integer, got 'many'", fix="expected an integer",
               absent=[case / "run"])


def stale_rendezvous(w: World, case: Path) -> Run:
    """A rendezvous directory left by a teacher of an earlier run, which has exited."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    group = case / "rdv" / "group-0"
    (group / "gen-3").mkdir(parents=True)
    (group / "manifest.json").write_text(json.dumps({"generation": 3, "protocol": 2}))
    (group / "gen-3" / "teacher.alive").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "time": time.time() - 3600}))
    return Run("trainer", w.config(case), problem=f"process {gone.pid}",
               fix="start it with `python -m services.teacher", untouched=[case / "rdv"],
               absent=[case / "run"])


def two_teachers(w: World, case: Path) -> Run:
    cfg = w.config(case)
    first = w.teacher(cfg)
    manifest = case / "rdv" / "group-0" / "manifest.json"
    before = manifest.read_text()

    def first_still_serves() -> None:
        assert first.poll() is None and manifest.read_text() == before

    doc = yaml.safe_load(cfg.read_text())
    doc["teacher"]["metrics_port"] = free_port()
    second = write_config(case / "second.yaml", doc)
    return Run("teacher", second, problem="group 0 already has a teacher",
               fix="stop that one, or give this one another --group", after=first_still_serves)


def group_size(w: World, case: Path) -> Run:
    w.teacher(w.config(case / "served", link={"rendezvous_dir": str(case / "rdv"),
                                              "trainers_per_group": 2}))
    cfg = w.config(case)
    return Run("trainer", cfg, problem="the teacher serves 2 trainers per group, this trainer "
               "expects 1", fix="set link.trainers_per_group the same on both sides",
               absent=[case / "run"])


def metrics_port(w: World, case: Path) -> Run:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    w.closers.append(holder.close)
    cfg = w.config(case, train={"metrics_port": port})
    return Run("trainer", cfg, problem=f"cannot serve metrics on 127.0.0.1:{port}",
               fix="set train.metrics_port", absent=[case / "run"])


def truncated_checkpoint(w: World, case: Path) -> Run:
    """A run with two checkpoints, the newest one's optimizer file cut short."""
    cfg = w.config(case, train={"stage": "sft", "steps": 2, "checkpoint_every": 1})
    shutil.copytree(w.checkpointed / "run", case / "run")
    (victim,) = (case / "run" / "checkpoints" / "step-2").rglob("*optim_states.pt")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return Run("trainer", cfg, problem="is damaged", fix="previous complete checkpoint",
               untouched=[case / "run"])


def empty_dataset(w: World, case: Path) -> Run:
    (case / "empty.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (case / "empty.jsonl").write_text("")
    subprocess.run([sys.executable, "-m", "services.data", "text", "--paths",
                    str(case / "empty.jsonl"), "--tokenizer", str(w.tiny), "--output_dir",
                    str(case / "ds"), "--max_len", "48"], cwd=ROOT, env=service_env(),
                   check=True, capture_output=True)
    cfg = w.config(case, data={"train_dir": str(case / "ds")})
    return Run("trainer", cfg, problem="holds no training samples", fix="check its inputs",
               untouched=[case / "ds"], absent=[case / "run"])


def mix_weights(w: World, case: Path) -> Run:
    """Three shares for two datasets (data.train_dir + one of data.mix_dirs)."""
    cfg = w.config(case, data={"mix_dirs": [str(w.data)], "mix_weights": [1.0, 2.0, 3.0]})
    return Run("trainer", cfg, problem="data.mix_weights has 3 entries for 2 datasets",
               fix="give one per dataset", absent=[case / "run"])


def deepspeed_json(w: World, case: Path) -> Run:
    case.mkdir(parents=True, exist_ok=True)
    ds = case / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1},
                              "train_micro_batch_size_per_gpu": 8}))
    cfg = w.config(case, train={"deepspeed_config": str(ds)})
    return Run("trainer", cfg, problem="train_micro_batch_size_per_gpu=8 but "
               "data.micro_batch_size=2", fix="remove them from the JSON", absent=[case / "run"])


CASES = [vocabulary, tokenizer, dataset_tokenizer, too_long, token_id, model_missing,
         not_a_model, unknown_key, ill_typed_key, stale_rendezvous, two_teachers, group_size,
         metrics_port, truncated_checkpoint, empty_dataset, mix_weights, deepspeed_json]


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_a_clear_error(make, world, tmp_path):
    run = make(world, tmp_path / "case")
    before = snapshot(run.untouched)
    if run.service == "trainer":
        env = rank_env()
        cmd = [sys.executable, "-m", "services.trainer", "--config", str(run.config)]
    else:
        env = service_env()
        cmd = [sys.executable, "-m", "services.teacher", "--config", str(run.config),
               "--group", "0"]
    started = time.monotonic()
    done = subprocess.run(cmd + run.args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_SECONDS)
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    errors = [line for line in out.splitlines() if " ERROR " in line]
    print(f"\n{make.__name__}: exit {done.returncode} after {seconds:.1f} s: "
          f"{errors[-1].split(' ERROR ', 1)[1] if errors else '(no error line)'}")
    assert done.returncode != 0, out[-3000:]
    assert errors, f"no error line:\n{out[-3000:]}"
    assert any(run.problem in line and run.fix in line for line in errors), \
        f"expected one line naming {run.problem!r} and {run.fix!r}:\n" + "\n".join(errors)
    assert "Traceback" not in out, out[-3000:]
    assert snapshot(run.untouched) == before, "the bad input changed files it must not touch"
    for path in run.absent:
        assert not path.exists(), f"{path} was created"
    if run.after is not None:
        run.after()
