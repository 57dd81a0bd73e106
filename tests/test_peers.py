"""The trainer ranks' peer watch (services/trainer/peers.py): on a real TCP store in one
process (the watches keep their process: ``exit_process=False``), and under torchrun with
Gloo or NCCL (tests/peer_worker.py). The trainer's own multi-node jobs that rely on it are in
tests/test_trainer.py (a stopped rank, a rank failing on its way in)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, free_port, process_state, service_env
from services.trainer.peers import PeerWatch

TIMEOUT = 1.5


STARTED: list[PeerWatch] = []


@pytest.fixture
def store():
    yield dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    while STARTED:  # stop the threads before their store goes
        STARTED.pop()._stop.set()


def watches(store, world: int, armed: bool = True) -> list[PeerWatch]:
    out = [PeerWatch(dist.PrefixStore("job", store), r, world, TIMEOUT, exit_process=False)
           for r in range(world)]
    for w in out:
        STARTED.append(w.start())
        if armed:
            w.arm()
    return out


def until(predicate, seconds: float) -> None:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, "timed out"
        time.sleep(0.02)


def test_a_silent_rank_is_named_by_every_rank(store):
    ws = watches(store, 4)
    time.sleep(TIMEOUT)                  # all beating: nobody is lost
    assert [w.lost for w in ws] == [None] * 4
    ws[2]._stop.set()                    # rank 2 stops beating, as a SIGSTOPped process
    until(lambda: all(w.lost for w in (ws[0], ws[1], ws[3])), TIMEOUT * 4)
    for w in (ws[0], ws[1], ws[3]):
        assert "trainer rank 2 of 4" in w.lost and "sent no heartbeat" in w.lost, w.lost


def test_a_failing_rank_tells_the_others_within_a_beat(store):
    ws = watches(store, 3, armed=False)  # before the process group: failures count already
    ws[1].fail(RuntimeError("port 9501 is taken"))
    until(lambda: ws[0].lost and ws[2].lost, TIMEOUT * 4)  # unarmed: only a posted failure
    assert "trainer rank 1" in ws[0].lost and "RuntimeError: port 9501 is taken" in ws[0].lost


def test_unarmed_silence_and_a_finished_rank_are_no_loss(store):
    ws = watches(store, 3, armed=False)
    ws[1]._stop.set()                    # not yet joined (slow start): silence is no loss
    time.sleep(TIMEOUT * 2)
    assert [w.lost for w in ws] == [None] * 3
    ws = watches(dist.PrefixStore("second", store), 3)
    ws[1].finish()                       # done and exited: its watcher must not call it lost
    time.sleep(TIMEOUT * 2)
    assert [w.lost for w in ws] == [None] * 3


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_under_torchrun_a_slow_peer_is_waited_for_and_a_stopped_one_ends_the_job(tmp_path,
                                                                                  backend):
    # a rank blocked in a collective (on a GPU: NCCL) keeps beating, so a peer that is slow is
    # not taken for lost; one that is stopped ends the job within the timeout
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    timeout = 4.0
    log = tmp_path / "torchrun.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(ROOT / "tests" / "peer_worker.py"), backend, str(timeout), str(tmp_path)],
        cwd=ROOT, env=service_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        until(lambda: proc.poll() is not None or "step 3 " in _read(tmp_path / "rank-1.txt"),
              180)
        assert proc.poll() is None, log.read_text()[-3000:]    # phase 1: nobody lost
        pids = [int(_read(tmp_path / f"rank-{r}.txt").split()[1]) for r in (0, 1)]
        os.kill(pids[1], signal.SIGSTOP)
        # rank 0 leaves by itself (a zombie, not yet reaped by torchrun, has left too)
        until(lambda: process_state(pids[0]) in (None, "Z"), 60)
        os.kill(pids[1], signal.SIGKILL)  # (torchrun's own SIGTERM waits 30 s on a stopped rank)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert proc.returncode != 0
    assert "trainer rank 1 of 2" in out and "sent no heartbeat" in out, out[-3000:]
    assert "exitcode  : 75" in out, out[-3000:]


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""

