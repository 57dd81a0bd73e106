"""Talking to the stack's supervisord: its XML-RPC socket, its pid, starting and waiting.

Once ``up`` has started supervisord, this module starts the programs that wait for others
(compose's ``depends_on`` conditions, including ``service_healthy`` by running the service's
healthcheck here), waits for healthchecks (``up --wait``), and tells why the stack stopped
when supervisord went away. ``down`` uses its pid and socket probes to wait for the shutdown.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from .errors import RunnerError
from .render import Plan, Program, local_path_env

POLL = 0.5  # seconds between state polls when no healthcheck sets the pace


def rpc_proxy(sock: Path) -> Any:
    """An XML-RPC client of the supervisord that listens on the unix socket ``sock``."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_alive(sock: Path) -> bool:
    """Whether a supervisord answers on ``sock`` (a socket file left behind does not count)."""
    if not sock.exists():
        return False
    try:
        rpc_proxy(sock).supervisor.getState()
        return True
    except (OSError, xmlrpc.client.Error):
        return False


def read_pid(run_dir: Path) -> int | None:
    """supervisord's pid from its pidfile in ``run_dir``; None when there is none to read."""
    try:
        return int((run_dir / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def exit_record(run_dir: Path) -> dict[str, Any] | None:
    """What the stop-on-fatal listener recorded when it stopped the stack, if it did."""
    try:
        return json.loads((run_dir / "exit-status.json").read_text())
    except (OSError, ValueError):
        return None


def stopped_message(plan: Plan) -> str:
    """One line on why supervisord is gone: the program that stopped it, else its own log."""
    record = exit_record(plan.run_dir)
    logs = plan.run_dir / "logs"
    if record:
        state = record.get("event", "").rsplit("_", 1)[-1]
        return (f"supervisord stopped: {record.get('process')} went {state} "
                f"(see {logs}/{record.get('process')}.log)")
    return f"supervisord is not running (see {plan.run_dir / 'supervisord.log'})"


def _state(rpc: Any, name: str) -> dict[str, Any]:
    return rpc.supervisor.getProcessInfo(name)


def run_healthcheck(plan: Plan, prog: Program) -> bool:
    assert prog.healthcheck is not None and prog.healthcheck_argv is not None
    env = dict(os.environ)
    env["PATH"] = local_path_env()
    env.update(prog.environment)
    try:
        done = subprocess.run(prog.healthcheck_argv, cwd=prog.directory, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=prog.healthcheck.timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return done.returncode == 0


def wait_ready(plan: Plan, rpc: Any, name: str, condition: str, deadline: float | None) -> None:
    """Block until ``name`` satisfies a compose depends_on ``condition``."""
    prog = plan.program(name)
    hc = prog.healthcheck if condition == "service_healthy" else None
    if condition == "service_healthy" and (hc is None or prog.healthcheck_argv is None):
        raise RunnerError(f"{name} has no healthcheck, but a service waits for it to be healthy")
    started = time.monotonic()
    failures = 0
    while True:
        try:
            info = _state(rpc, name)
        except (OSError, xmlrpc.client.Error):
            raise RunnerError(stopped_message(plan)) from None
        state = info["statename"]
        if condition == "service_completed_successfully":
            if state == "EXITED":
                if info["exitstatus"] == 0:
                    return
                raise RunnerError(f"{name} exited with status {info['exitstatus']}")
        elif state == "FATAL" or (state in ("EXITED", "STOPPED") and prog.autorestart == "false"):
            raise RunnerError(f"{name} is {state} (see {prog.logfile})")
        elif state == "RUNNING":
            if hc is None:
                return
            if run_healthcheck(plan, prog):
                return
            if time.monotonic() - started > hc.start_period:
                failures += 1
                if failures >= hc.retries:
                    raise RunnerError(f"{name} is unhealthy: its healthcheck failed {failures} "
                                      f"times (see {prog.logfile})")
        if deadline is not None and time.monotonic() > deadline:
            raise RunnerError(f"timed out waiting for {name} ({condition}); see {prog.logfile}")
        if hc is None:
            time.sleep(POLL)
        elif time.monotonic() - started < hc.start_period:
            time.sleep(min(hc.interval, hc.start_interval))
        else:
            time.sleep(hc.interval)


def _default_deadline(plan: Plan, names: list[str]) -> float:
    worst = 60.0
    for n in names:
        hc = plan.program(n).healthcheck
        if hc:
            worst = max(worst, hc.start_period + hc.interval * (hc.retries + 1) + 30)
    return worst


def start_dependents(plan: Plan, rpc: Any, timeout: float | None, wait_all: bool) -> None:
    for prog in plan.programs:
        if prog.autostart:
            continue
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else _default_deadline(plan, list(prog.depends_on)))
        for dep, condition in prog.depends_on.items():
            print(f"runner: {prog.name} waits for {dep} ({condition})", flush=True)
            wait_ready(plan, rpc, dep, condition, deadline)
        print(f"runner: starting {prog.name}", flush=True)
        try:
            rpc.supervisor.startProcess(prog.name, False)
        except (OSError, xmlrpc.client.Error) as err:
            raise RunnerError(f"cannot start {prog.name}: {err}; {stopped_message(plan)}") \
                from None
    if wait_all:
        names = [p.name for p in plan.programs if p.healthcheck and p.healthcheck_argv]
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else _default_deadline(plan, names))
        for name in names:
            print(f"runner: waiting for {name} to be healthy", flush=True)
            wait_ready(plan, rpc, name, "service_healthy", deadline)


def supervisord_cmd(conf: Path) -> list[str]:
    """supervisord of this Python's environment, so the runner's venv provides it."""
    return [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)]


def supervisorctl_cmd(conf: Path, *args: str) -> list[str]:
    """supervisorctl of this Python's environment, on the stack's conf."""
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args]


def max_stopwait(conf: Path) -> float:
    """The longest ``stopwaitsecs`` of a rendered conf: how long a shutdown may take."""
    worst = 10.0
    for line in conf.read_text().splitlines():
        if line.startswith("stopwaitsecs="):
            worst = max(worst, float(line.split("=", 1)[1]))
    return worst
