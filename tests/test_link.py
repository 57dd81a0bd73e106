"""The teacher link on CPU: real Gloo process groups between real processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    ROOT,
    free_port,
    service_env,
    start_teacher,
    wait_for,
    wait_healthy,
    write_config,
)
from shared.metrics import scrape

WORKER = str(ROOT / "tests" / "link_worker.py")


def make_config(tmp_path: Path, model: Path, trainers: int, timeout: float = 10.0,
                reconnect: float = 60.0) -> tuple[Path, int]:
    port = free_port()
    cfg = write_config(tmp_path / "link.yaml", {
        "teacher": {"model_path": str(model), "metrics_port": port, "max_batch_tokens": 24,
                    "gather_window_seconds": 2.0},
        "link": {"rendezvous_dir": str(tmp_path / "rdv"), "trainers_per_group": trainers,
                 "timeout_seconds": timeout, "heartbeat_seconds": 0.5,
                 "reconnect_seconds": reconnect},
    })
    return cfg, port


def run_workers(cfg: Path, groups: int, trainers: int, scenario: str, out: Path,
                extra: list[str] | None = None) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, WORKER, str(cfg), str(g), str(i), scenario,
                              str(out / f"g{g}-t{i}"), *(extra or [])], env=service_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for g in range(groups) for i in range(trainers)]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    return outs


@pytest.fixture
def reference(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


def check_against_direct_forward(model, path: Path, bf16_tol: float = 2e-2,
                                 exact_tol: float = 1e-4) -> None:
    """Every returned tensor equals a direct forward of the same model on the same ids.

    ``exact_tol`` applies where the wire format is float32 (fp32 logits, top-k log-probs,
    fp32 hidden states): on CPU the teacher and the reference compute in float32.
    """
    device = next(model.parameters()).device
    data = {k: v.to(device) for k, v in load_file(str(path)).items()}
    ids, lengths = data["ids"], data["lengths"]
    name = path.stem.split("-")[1]
    from link_worker import SPECS

    spec = SPECS[name]
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        # packed rows (position ids restarting at a document) must equal separate forwards
        bounds = [0, n]
        if "positions" in data:
            pos = data["positions"][row, :n]
            bounds = [0] + [t for t in range(1, n) if pos[t] != pos[t - 1] + 1] + [n]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            check_document(model, data, spec, row, s, e, bf16_tol, exact_tol)
        if n < ids.shape[1]:  # padding positions are zeros, never stale memory
            for key, tensor in data.items():
                if key not in ("ids", "lengths", "positions"):
                    pad = tensor[:, row, n:] if key == "hidden_states" else tensor[row, n:]
                    assert not pad.any(), key


def check_document(model, data: dict, spec, row: int, s: int, e: int, bf16_tol: float,
                   exact_tol: float) -> None:
    """Tokens s..e of ``row`` against a forward of those tokens alone."""
    ids = data["ids"]
    with torch.no_grad():
        ref = model(ids[row:row + 1, s:e], output_hidden_states=True)
    logits = ref.logits[0].float()
    if spec.logits == "bf16":
        got = data["logits"][row, s:e].float()
        torch.testing.assert_close(got, logits, atol=bf16_tol, rtol=bf16_tol / 2)
    elif spec.logits == "fp32":
        torch.testing.assert_close(data["logits"][row, s:e], logits, atol=exact_tol,
                                   rtol=exact_tol)
    elif spec.logits == "topk":
        want = torch.log_softmax(logits / spec.temperature, -1).topk(spec.top_k, -1)
        torch.testing.assert_close(data["topk_logprobs"][row, s:e], want.values,
                                   atol=exact_tol, rtol=exact_tol)
        same = (data["topk_indices"][row, s:e].long() == want.indices).float().mean()
        assert same >= (1.0 if exact_tol <= 1e-4 else 0.9), same
    num_layers = model.config.num_hidden_layers
    for slot, layer in enumerate(spec.hidden_layers):
        got = data["hidden_states"][slot, row, s:e].float()
        if layer < num_layers:
            want = ref.hidden_states[layer][0]
        else:  # state L is pre-norm; the model's final norm of it is last_hidden_state
            got = model.model.norm(got[None])[0]
            want = model.model(ids[row:row + 1, s:e]).last_hidden_state[0]
        tol = exact_tol if spec.hidden_dtype == torch.float32 else bf16_tol
        torch.testing.assert_close(got, want.float(), atol=tol, rtol=tol)


def test_one_teacher_two_trainers_all_modes(tmp_path, tiny_llama, reference):
    cfg, port = make_config(tmp_path, tiny_llama, trainers=2)
    teacher = start_teacher(cfg, 0, tmp_path / "teacher.log")
    wait_healthy(port, teacher)
    try:
        outs = finish(run_workers(cfg, 1, 2, "all", tmp_path / "out"))
        assert all("DONE" in o for o in outs), outs
        files = sorted((tmp_path / "out").glob("*/*.safetensors"))
        assert len(files) == 2 * 8
        # the second pass of every mode sends a packed row (two documents)
        assert sum("positions" in load_file(str(f)) for f in files) == 2 * 4
        for f in files:
            check_against_direct_forward(reference, f)
        metrics = scrape(port)
        tokens = sum(int(load_file(str(f))["lengths"].sum()) for f in files)
        assert metrics['distill_teacher_tokens_total{group="0"}'] == tokens
        # both trainers' requests of a step are packed into one forward (8 rounds, not 16)
        assert metrics['distill_teacher_batches_total{group="0"}'] == 8
        assert metrics['distill_teacher_ready{group="0"}'] == 1
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200
    finally:
        teacher.send_signal(signal.SIGTERM)
        assert teacher.wait(30) == 0, (tmp_path / "teacher.log").read_text()


def test_two_groups_of_two(tmp_path, tiny_llama, reference):
    cfg, port = make_config(tmp_path, tiny_llama, trainers=2)
    teachers = [start_teacher(cfg, g, tmp_path / f"teacher{g}.log") for g in range(2)]
    for g, t in enumerate(teachers):
        wait_healthy(port + g, t)
    try:
        outs = finish(run_workers(cfg, 2, 2, "hidden", tmp_path / "out"))
        assert all("DONE" in o for o in outs), outs
        for g in range(2):
            files = sorted((tmp_path / "out").glob(f"g{g}-*/*.safetensors"))
            assert len(files) == 4
            for f in files:
                check_against_direct_forward(reference, f)
            assert scrape(port + g)[f'distill_teacher_batches_total{{group="{g}"}}'] == 2
    finally:
        for t in teachers:
            t.send_signal(signal.SIGTERM)
            t.wait(30)


def test_async_requests_overlap_with_training(tmp_path, tiny_llama):
    cfg, port = make_config(tmp_path, tiny_llama, trainers=1)
    teacher = start_teacher(cfg, 0, tmp_path / "teacher.log")
    wait_healthy(port, teacher)
    try:
        (out,) = finish(run_workers(cfg, 1, 1, "overlap", tmp_path / "out"))
        assert "DONE" in out, out
        times = json.loads((tmp_path / "out" / "g0-t0" / "times.json").read_text())
        assert len(times) == 4
        for step in times:
            c0, c1 = step["compute"]
            f0, f1 = step["teacher_forward"]
            # the teacher computed step k+1 before the trainer finished computing step k
            # (a 10 ms forward may even finish before the 1 s step has started) ...
            assert f0 < c1 and f1 <= c1, step
            # ... and the answer was there when the step finished
            assert step["ready_after_compute"], step
    finally:
        teacher.send_signal(signal.SIGTERM)
        teacher.wait(30)


def test_handshake_refusals(tmp_path, tiny_llama):
    cfg, port = make_config(tmp_path, tiny_llama, trainers=1, timeout=10)
    teacher = start_teacher(cfg, 0, tmp_path / "teacher.log")
    wait_healthy(port, teacher)
    try:
        # wrong vocabulary size
        (out,) = finish(run_workers(cfg, 1, 1, "bf16", tmp_path / "o1", ["1000"]))
        assert "vocabulary size differs" in out, out
        # a trainer built for another tokenizer
        other = tmp_path / "other-tok"
        from shared.tiny import train_tokenizer

        train_tokenizer(other, vocab_size=300)
        bad = write_config(tmp_path / "bad.yaml", {
            "teacher": {"model_path": str(other)},
            "link": {"rendezvous_dir": str(tmp_path / "rdv"), "trainers_per_group": 1,
                     "timeout_seconds": 10}})
        (out,) = finish(run_workers(bad, 1, 1, "bf16", tmp_path / "o2"))
        assert "tokenizer fingerprint differs" in out, out
        # another protocol version, and another group size
        manifest = tmp_path / "rdv" / "group-0" / "manifest.json"
        m = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**m, "protocol": 99, "trainers": 3}))
        (out,) = finish(run_workers(cfg, 1, 1, "bf16", tmp_path / "o3"))
        assert "link protocol 99" in out and "3 trainers per group" in out, out
        manifest.write_text(json.dumps(m))
        # ids outside the vocabulary / too many tokens: refused before anything is sent
        (out,) = finish(run_workers(cfg, 1, 1, "bad", tmp_path / "o4"))
        assert "DONE" in out, out
        errors = json.loads((tmp_path / "o4" / "g0-t0" / "errors.json").read_text())
        assert "vocabulary" in errors[0] and "exceeds the teacher's limit" in errors[1]
        assert "position_ids must have the shape of input_ids" in errors[2]
    finally:
        teacher.send_signal(signal.SIGTERM)
        teacher.wait(30)


def test_no_teacher_is_a_clear_error_within_timeout(tmp_path, tiny_llama):
    cfg, _ = make_config(tmp_path, tiny_llama, trainers=1, timeout=3)
    t0 = time.monotonic()
    (out,) = finish(run_workers(cfg, 1, 1, "bf16", tmp_path / "o"))
    assert "no live teacher for group 0" in out, out
    assert time.monotonic() - t0 < 30


def read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Output of ``proc`` up to the first new line containing ``marker`` (bounded even when
    the worker falls silent: a thread reads its stdout)."""
    state = proc.__dict__.setdefault("_lines", {"lines": [], "cursor": 0})
    if "thread" not in state:
        def pump() -> None:
            for line in proc.stdout:
                state["lines"].append(line)
        state["thread"] = threading.Thread(target=pump, daemon=True)
        state["thread"].start()

    def found() -> bool:
        new = state["lines"][state["cursor"]:]
        return any(marker in line for line in new)
    try:
        wait_for(found, timeout, f"{marker!r} from a worker")
    except AssertionError as err:
        raise AssertionError(f"{err}; it printed: {''.join(state['lines'])[-3000:]}") from None
    new = state["lines"][state["cursor"]:]
    end = next(i for i, line in enumerate(new) if marker in line) + 1
    state["cursor"] += end
    return "".join(new[:end])


def test_trainers_outlive_a_killed_trainer_a_killed_teacher_and_a_hung_teacher(tmp_path,
                                                                                tiny_llama):
    """Killed trainer (restarted): the group re-forms. Killed teacher (restarted): every trainer
    rejoins its new generation. Hung teacher (SIGSTOP past the timeout, then SIGCONT): noticed
    and rejoined. No teacher coming back: a clear error after link.reconnect_seconds. The same
    request always gets the same answer (the worker checks it)."""
    cfg, port = make_config(tmp_path, tiny_llama, trainers=2, timeout=6, reconnect=20)
    teacher = start_teacher(cfg, 0, tmp_path / "teacher.log")
    wait_healthy(port, teacher)
    out = tmp_path / "out"
    procs = []
    try:
        procs = run_workers(cfg, 1, 2, "hold", out)
        for p in procs:
            read_until(p, "READY", 60)
        gen = scrape(port)['distill_teacher_generation{group="0"}']
        procs[0].kill()                          # a trainer dies and is started again
        procs[0].wait()
        procs[0] = run_workers(cfg, 1, 2, "hold", out)[0]
        read_until(procs[0], "READY", 60)
        read_until(procs[1], "RECONNECTED", 60)
        assert scrape(port)['distill_teacher_generation{group="0"}'] > gen

        teacher.kill()                           # the teacher dies and is started again
        teacher.wait()
        teacher = start_teacher(cfg, 0, tmp_path / "teacher2.log")
        for p in procs:
            read_until(p, "RECONNECTED", 90)

        teacher.send_signal(signal.SIGSTOP)      # the teacher hangs past link.timeout_seconds
        time.sleep(6 + 4)
        teacher.send_signal(signal.SIGCONT)
        for p in procs:
            read_until(p, "RECONNECTED", 60)

        teacher.kill()                           # the teacher dies for good
        t0 = time.monotonic()
        for p in procs:
            text = read_until(p, "LINK_ERROR", 60)
            assert "did not come back within 20 s" in text and str(tmp_path / "rdv") in text, text
            assert "heartbeat" in text, text
        assert time.monotonic() - t0 < 6 + 20 + 10
        assert all(p.wait(10) == 3 for p in procs)
    except AssertionError:
        for i, p in enumerate(procs):  # every worker's output, for the failure report
            lines = p.__dict__.get("_lines", {}).get("lines", [])
            print(f"--- worker {i} ---\n" + "".join(lines)[-4000:])
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if teacher.poll() is None:
            teacher.kill()


def test_waiting_for_trainers_never_waits_on_the_stop_event():
    """The teacher's SIGTERM handler sets the stop event in the main thread; a main thread
    inside ``stop.wait()`` holds the event's lock for an instant, and a signal landing there
    hung the teacher for good (CI, 2026-12-04). The wait for trainers polls ``is_set`` and
    sleeps instead."""
    from shared.link.server import wait_until

    class NoWait(threading.Event):
        def wait(self, timeout=None):
            raise AssertionError("the main thread waited on the stop event")

    stop = NoWait()
    answers = iter([False, False, True])
    assert wait_until(lambda: next(answers), stop, poll=0.001) is True
    stop.set()
    assert wait_until(lambda: False, stop, poll=0.001) is False


def test_sigterm_while_waiting_for_trainers_stops_the_teacher(tmp_path, tiny_llama):
    """SIGTERM to a teacher that no trainer has joined: it says so, stops and exits 0."""
    cfg, port = make_config(tmp_path, tiny_llama, trainers=2)
    log = tmp_path / "teacher.log"
    proc = start_teacher(cfg, 0, log)
    try:
        wait_healthy(port, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "signal 15: finishing the batch in flight, then exiting" in text and "stopped" in text
