"""Real supervisord: the runner's stack and the container entrypoint behave as promised.

* a program that goes FATAL makes the event listener shut supervisord (the stack) down, as a
  container stops;
* ``make up-local`` / ``make down-local`` start supervisord and stop it via supervisorctl;
* ``depends_on: service_healthy`` holds a service back until the compose healthcheck passes;
* docker/entrypoint.py (the image's ENTRYPOINT) passes the program's output and exit status
  through, stops on FATAL, and on SIGTERM stops the program's whole process group.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, wait_for
from services.runner.cli import main as runner_main
from services.runner.cli import rpc_proxy
from services.runner.render import socket_path

ENTRYPOINT = ROOT / "docker" / "entrypoint.py"


def processes_with(token: str) -> list[int]:
    """PIDs (not zombies) whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def stack(tmp_path: Path):
    """A scratch compose project; whatever the test starts is stopped afterwards."""
    run_dir = tmp_path / "run"
    yield tmp_path, run_dir
    if (run_dir / "supervisord.conf").exists():
        runner_main(["down", "-f", str(tmp_path / "compose.yaml"), "--run-dir", str(run_dir),
                     "--timeout", "30"])
    for pid in processes_with(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def supervisord_pid(run_dir: Path) -> int:
    wait_for(lambda: (run_dir / "supervisord.pid").exists(), 10, "supervisord pidfile")
    return int((run_dir / "supervisord.pid").read_text())


def test_fatal_program_shuts_the_stack_down(stack):
    proj, run_dir = stack
    token = str(proj)
    (proj / "compose.yaml").write_text(f"""
services:
  sleeper:
    image: busybox
    command: ["python", "-c", "import time; time.sleep(120)", "{token}"]
    restart: unless-stopped
  crasher:
    image: busybox
    # FATAL means "exited before startsecs (1 s)": a shell exits in milliseconds, where a
    # Python interpreter on a loaded 2-core CI machine once took longer and went RUNNING →
    # EXITED instead (a crash after start, which compose, too, leaves the other services up for).
    command: ["sh", "-c", "exit 1", "{token}"]
    restart: "no"
""")
    rc = runner_main(["up", "-f", str(proj / "compose.yaml"), "--run-dir", str(run_dir)])
    assert rc in (0, 1)  # 1 when supervisord was already gone before `up` returned
    pid = supervisord_pid(run_dir)
    try:
        wait_for(lambda: not pid_alive(pid), 30, "the FATAL listener to stop supervisord")
    except AssertionError as e:
        states = {n: rpc_proxy(socket_path(run_dir)).supervisor.getProcessInfo(n)["statename"]
                  for n in ("sleeper", "crasher")}
        raise AssertionError(f"{e}; program states: {states}") from None
    wait_for(lambda: not processes_with(token), 10, "the sleeper to be stopped")
    record = json.loads((run_dir / "exit-status.json").read_text())
    assert record["process"] == "crasher" and record["event"] == "PROCESS_STATE_FATAL"
    assert "crasher" in (run_dir / "logs" / "stop-on-fatal.log").read_text()


def test_make_up_local_and_down_local(stack):
    proj, run_dir = stack
    token = str(proj)
    compose = proj / "compose.local.yaml"  # not compose.yaml: that one needs a .env
    compose.write_text(f"""
services:
  sleeper:
    image: busybox
    command: ["python", "-c", "import time; print('sleeping', flush=True); time.sleep(120)",
              "{token}"]
    restart: unless-stopped
""")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    make = ["make", "--no-print-directory", "-f", str(ROOT / "deploy.mk"),
            f"RUNNER={sys.executable} -m services.runner",
            f"LOCAL_FILE={compose}", f"LOCAL_RUN_DIR={run_dir}"]
    up = subprocess.run(make + ["up-local"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    pid = supervisord_pid(run_dir)
    rpc = rpc_proxy(socket_path(run_dir))
    wait_for(lambda: rpc.supervisor.getProcessInfo("sleeper")["statename"] == "RUNNING", 15,
               "sleeper RUNNING")
    wait_for(lambda: "sleeping" in (run_dir / "logs" / "sleeper.log").read_text(), 15,
               "the sleeper's output in its log file")
    assert processes_with(token)
    down = subprocess.run(make + ["down-local"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not pid_alive(pid)
    wait_for(lambda: not processes_with(token), 10, "the sleeper to be stopped")


def test_depends_on_service_healthy_holds_the_dependent_back(stack):
    proj, run_dir = stack
    token, port = str(proj), free_port()
    # The server becomes healthy only after 2 s; the client must start after that.
    (proj / "compose.yaml").write_text(f"""
services:
  server:
    image: busybox
    command:
      - python
      - -c
      - >-
        import http.server, time;
        time.sleep(2);
        http.server.HTTPServer(("127.0.0.1", ${{PORT}}),
        http.server.SimpleHTTPRequestHandler).serve_forever()
      - "{token}"
    healthcheck:
      test: ["CMD", "python", "-c",
             "import urllib.request;
              urllib.request.urlopen('http://127.0.0.1:${{PORT}}/', timeout=2)"]
      interval: 1s
      timeout: 2s
      retries: 3
      start_period: 30s
    restart: unless-stopped
  client:
    image: busybox
    command: ["python", "-c", "import time; print(time.time(), flush=True); time.sleep(120)",
              "{token}"]
    depends_on:
      server:
        condition: service_healthy
""")
    t0 = time.time()
    rc = runner_main(["up", "-f", str(proj / "compose.yaml"), "--run-dir", str(run_dir),
                      "--env", f"PORT={port}", "--wait"])
    assert rc == 0
    rpc = rpc_proxy(socket_path(run_dir))
    assert rpc.supervisor.getProcessInfo("server")["statename"] == "RUNNING"
    wait_for(lambda: (run_dir / "logs" / "client.log").exists()
               and (run_dir / "logs" / "client.log").read_text().strip(), 15, "client output")
    started = float((run_dir / "logs" / "client.log").read_text().split()[0])
    assert started - t0 >= 2.0, "the client started before the server was healthy"
    assert runner_main(["down", "-f", str(proj / "compose.yaml"), "--run-dir", str(run_dir)]) == 0


# --------------------------------------------------------------------------- entrypoint
def entrypoint(*argv: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ENTRYPOINT), "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, STOP_WAIT_SECS="5"), **kw)


def test_entrypoint_passes_output_and_exit_status_through():
    proc = entrypoint(sys.executable, "-c",
                      "import sys; print('to stdout'); print('to stderr', file=sys.stderr); "
                      "sys.exit(3)")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert "to stdout" in out and "to stderr" in out


def test_entrypoint_exits_nonzero_when_the_program_cannot_start():
    proc = entrypoint("/nonexistent/program")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "FATAL" in out


def test_entrypoint_sigterm_stops_the_whole_process_group(tmp_path: Path):
    token = str(tmp_path)
    # A parent (like torchrun) with a child that only dies if the group gets the signal.
    # One os.write for the whole line: print() writes its pieces separately when unbuffered
    # (PYTHONUNBUFFERED), and supervisord's own log lines, on the same stdout, then land between.
    script = ("import os, signal, subprocess, sys, time\n"
              "child = subprocess.Popen(['sleep', '300'])\n"
              "os.write(1, f'ready {child.pid}\\n'.encode())\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('parent got TERM', flush=True),"
              " sys.exit(0)))\n"
              "time.sleep(300)\n")
    proc = entrypoint(sys.executable, "-c", script, token)
    child_pid = None
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.match(r"ready (\d+)$", line.strip())
        if found:
            child_pid = int(found.group(1))
            break
    assert child_pid and pid_alive(child_pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "parent got TERM" in out
    wait_for(lambda: not pid_alive(child_pid), 10, "the child to get the group's SIGTERM")
    assert not processes_with(token)
