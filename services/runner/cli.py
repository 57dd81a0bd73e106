"""``python -m services.runner``: run the compose stack as local supervisord programs.

    python -m services.runner up     [-f compose.yaml] [--services a,b] [--wait] [--foreground]
    python -m services.runner down   [-f compose.yaml]
    python -m services.runner status [-f compose.yaml]
    python -m services.runner logs   [-f compose.yaml] [SERVICE...] [--follow]
    python -m services.runner render [-f compose.yaml] [--stdout]
    python -m services.runner check  [-f compose.yaml] [--require-env-file]
    python -m services.runner ctl    [-f compose.yaml] -- SUPERVISORCTL ARGS...

Options shared by the commands (as in ``docker compose``): ``-f FILE`` (repeatable: later
files override earlier ones), ``--env-file FILE`` (default: ``.env`` beside the first file, if
any), ``--profile NAME``, ``--env KEY=VALUE`` (an interpolation variable; wins over the process
environment and ``.env``), ``--run-dir DIR`` (default ``runs/local/<file stem>``: conf, logs,
named volumes). ``up``/``render``/``check`` also take ``--services a,b`` (with their
dependencies unless ``--no-deps``) and ``--extra-args SERVICE='--train.steps 20'`` (appended
to that service's command; the compose way is an override file given with a second ``-f``).

``up`` starts supervisord in the background (``--foreground``: in this terminal until Ctrl-C),
starts a service only once its ``depends_on`` conditions hold (``service_healthy`` runs the
service's compose healthcheck here), and with ``--wait`` returns once every service that has
a healthcheck is healthy, like ``docker compose up -d --wait``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import yaml

from .compose import ComposeError, Project
from .render import (Plan, Program, build_plan, default_run_dir, local_path_env, socket_path,
                     write_conf)

POLL = 0.5


class RunnerError(RuntimeError):
    """A failure reported to the user as one line, exit status 1."""


# --------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                        help="compose file (repeatable; default compose.yaml)")
    common.add_argument("--project-dir", help="default: the first file's directory")
    common.add_argument("--env-file", action="append", default=None, metavar="FILE",
                        help="interpolation variables (default: <project dir>/.env if present)")
    common.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="interpolation variable (wins over the environment and .env)")
    common.add_argument("--profile", action="append", default=[], help="enable a profile")
    common.add_argument("--run-dir", help="conf, logs, volumes (default runs/local/<stem>)")

    select = argparse.ArgumentParser(add_help=False)
    select.add_argument("--services", action="append", default=[], metavar="A,B",
                        help="only these services (and their dependencies)")
    select.add_argument("--no-deps", action="store_true", help="don't add dependencies")
    select.add_argument("--extra-args", action="append", default=[], metavar="SERVICE=ARGS",
                        help="append shell-split ARGS to SERVICE's command")

    ap = argparse.ArgumentParser(prog="python -m services.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common, select], help="render and start the stack")
    up.add_argument("--wait", action="store_true", help="return once healthchecks pass")
    up.add_argument("--foreground", action="store_true", help="stay attached until Ctrl-C")
    up.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for dependencies/healthchecks (default: from them)")
    up.add_argument("--require-env-file", action="store_true",
                    help="fail when there is no .env (compose.yaml needs one)")
    r = sub.add_parser("render", parents=[common, select], help="write the supervisord.conf")
    r.add_argument("--stdout", action="store_true", help="print it instead of writing it")
    c = sub.add_parser("check", parents=[common, select], help="pre-flight checks only")
    c.add_argument("--require-env-file", action="store_true",
                   help="fail when there is no .env (the GPU node's `make up`)")
    d = sub.add_parser("down", parents=[common], help="stop the stack (supervisorctl shutdown)")
    d.add_argument("--timeout", type=float, default=None)
    sub.add_parser("status", parents=[common], help="supervisorctl status")
    lg = sub.add_parser("logs", parents=[common], help="show the services' log files")
    lg.add_argument("services", nargs="*")
    lg.add_argument("--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    ctl = sub.add_parser("ctl", parents=[common], help="run supervisorctl with the stack's conf")
    ctl.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def _files(args: argparse.Namespace) -> list[Path]:
    return [Path(f) for f in (args.file or ["compose.yaml"])]


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir).resolve()
    files = [f.resolve() for f in _files(args)]
    project_dir = Path(args.project_dir).resolve() if args.project_dir else files[0].parent
    return default_run_dir(project_dir, files)


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RunnerError(f"--env expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _extra_args(pairs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise RunnerError(f"--extra-args expects SERVICE=ARGS, got {pair!r}")
        out.setdefault(name, []).extend(shlex.split(value))
    return out


def _services(values: list[str]) -> list[str] | None:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


def load_project(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Project:
    return Project(_files(args), env_files=args.env_file, overrides=_overrides(args.env),
                   environ=environ, project_dir=args.project_dir)


def require_env_file(project: Project) -> None:
    if not project.env_files:
        raise RunnerError(
            f"no .env in {project.project_dir}: `cp .env.example .env`, then set MODELS_DIR, "
            f"TEACHER_MODEL, DATA_DIR, RUNS_DIR and GRAFANA_ADMIN_PASSWORD in it")


def plan_from_args(args: argparse.Namespace) -> Plan:
    project = load_project(args)
    if getattr(args, "require_env_file", False):
        require_env_file(project)
    return build_plan(project, run_dir=_run_dir(args), services=_services(args.services),
                      profiles=args.profile, with_deps=not args.no_deps,
                      extra_args=_extra_args(args.extra_args))


# --------------------------------------------------------------------------- pre-flight
def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def teacher_model_paths(plan: Plan) -> dict[str, Path]:
    """Host path of the teacher model each program loads (--teacher.model_path, else config)."""
    found: dict[str, Path] = {}
    for p in plan.programs:
        value = _flag_value(p.argv, "--teacher.model_path")
        if value is None:
            config = _flag_value(p.argv, "--config")
            if not config:
                continue
            cfg_path = Path(config) if Path(config).is_absolute() else Path(p.directory) / config
            try:
                doc = yaml.safe_load(cfg_path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue  # the service reports its own config errors
            value = str((doc.get("teacher") or {}).get("model_path") or "")
            if not value:
                continue
        path = Path(value)
        found[p.name] = path if path.is_absolute() else Path(p.directory) / path
    return found


def preflight(plan: Plan, create: bool = False) -> list[str]:
    """Problems that would stop the stack early; with ``create``, make writable mount dirs."""
    problems: list[str] = []
    for name, mounts in plan.mounts.items():
        for m in mounts:
            if m.kind == "volume":
                if create:
                    (plan.run_dir / "volumes" / m.source).mkdir(parents=True, exist_ok=True)
                continue
            if Path(m.source).exists():
                continue
            if m.read_only:
                problems.append(f"{name}: {m.source} (mounted at {m.target}) does not exist")
            elif create:
                Path(m.source).mkdir(parents=True, exist_ok=True)
    for name, path in teacher_model_paths(plan).items():
        if not (path / "config.json").is_file():
            problems.append(
                f"{name}: the teacher model {path} has no config.json - MODELS_DIR must hold "
                f"the configured teacher (TEACHER_MODEL) as a Hugging Face model directory")
    return sorted(set(problems))


# --------------------------------------------------------------------------- supervisord
def rpc_proxy(sock: Path) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        rpc_proxy(sock).supervisor.getState()
        return True
    except (OSError, xmlrpc.client.Error):
        return False


def _read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int | None) -> bool:
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


def _exit_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "exit-status.json").read_text())
    except (OSError, ValueError):
        return None


def _stopped_message(plan: Plan) -> str:
    record = _exit_record(plan.run_dir)
    logs = plan.run_dir / "logs"
    if record:
        return (f"supervisord stopped: {record.get('process')} went "
                f"{record.get('event', '').rsplit('_', 1)[-1]} (see {logs}/{record.get('process')}.log)")
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
            raise RunnerError(_stopped_message(plan)) from None
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
            raise RunnerError(f"cannot start {prog.name}: {err}; {_stopped_message(plan)}") \
                from None
    if wait_all:
        names = [p.name for p in plan.programs if p.healthcheck and p.healthcheck_argv]
        deadline = time.monotonic() + (timeout if timeout is not None
                                       else _default_deadline(plan, names))
        for name in names:
            print(f"runner: waiting for {name} to be healthy", flush=True)
            wait_ready(plan, rpc, name, "service_healthy", deadline)


def _supervisord_cmd(conf: Path) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)]


def _supervisorctl_cmd(conf: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args]


def cmd_up(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    for name, why in plan.skipped.items():
        print(f"runner: skipping {name}: {why}", flush=True)
    if not plan.programs:
        raise RunnerError("no service to run")
    problems = preflight(plan, create=True)
    if problems:
        raise RunnerError("refusing to start:\n  " + "\n  ".join(problems))
    sock = plan.socket_path
    if supervisord_alive(sock):
        raise RunnerError(f"already running (run dir {plan.run_dir}); "
                          f"`python -m services.runner down` first")
    if sock.exists():
        sock.unlink()
    (plan.run_dir / "exit-status.json").unlink(missing_ok=True)
    conf = write_conf(plan, foreground=args.foreground)
    print(f"runner: {conf}", flush=True)
    proc: subprocess.Popen[bytes] | None = None
    if args.foreground:
        proc = subprocess.Popen(_supervisord_cmd(conf))
    else:
        done = subprocess.run(_supervisord_cmd(conf), check=False)
        if done.returncode != 0:
            raise RunnerError(f"supervisord failed to start (see {plan.run_dir}/supervisord.log)")
    deadline = time.monotonic() + 30
    while not supervisord_alive(sock):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RunnerError(_stopped_message(plan))
        time.sleep(0.2)
    rpc = rpc_proxy(sock)
    try:
        start_dependents(plan, rpc, args.timeout, args.wait)
    except RunnerError:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        else:
            print(f"runner: the stack is left as it is; stop it with "
                  f"`python -m services.runner down {_cli_files(args)}`", file=sys.stderr)
        raise
    print(f"runner: up: {', '.join(p.name for p in plan.programs)}; logs in "
          f"{plan.run_dir / 'logs'}", flush=True)
    if proc is None:
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: proc.send_signal(signal.SIGTERM))
    proc.wait()
    record = _exit_record(plan.run_dir)
    return int(record["exit_status"]) if record else 0


def _cli_files(args: argparse.Namespace) -> str:
    parts = [f"-f {shlex.quote(str(f))}" for f in args.file]
    if args.run_dir:
        parts.append(f"--run-dir {shlex.quote(args.run_dir)}")
    return " ".join(parts)


def cmd_render(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    for name, why in plan.skipped.items():
        print(f"runner: skipping {name}: {why}", file=sys.stderr)
    if args.stdout:
        from .render import render_conf

        sys.stdout.write(render_conf(plan))
        return 0
    print(write_conf(plan))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    project = load_project(args)
    if args.require_env_file:
        require_env_file(project)
    names = project.select(_services(args.services), args.profile, not args.no_deps)
    for name in names:  # what compose would interpolate, runnable here or not
        project.service(name)
    plan = build_plan(project, run_dir=_run_dir(args), services=names, profiles=args.profile,
                      with_deps=False, extra_args=_extra_args(args.extra_args), resolve=False)
    problems = preflight(plan)
    if problems:
        raise RunnerError("refusing to start:\n  " + "\n  ".join(problems))
    for name, path in teacher_model_paths(plan).items():
        print(f"ok: {name} loads the teacher from {path}")
    print(f"ok: {', '.join(names)}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    conf = run_dir / "supervisord.conf"
    sock = socket_path(run_dir)
    pid = _read_pid(run_dir)
    if not conf.is_file() or not supervisord_alive(sock):
        print(f"runner: not running ({run_dir})")
        return 0
    done = subprocess.run(_supervisorctl_cmd(conf, "shutdown"), check=False)
    timeout = args.timeout if args.timeout is not None else _max_stopwait(conf) + 30
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) or supervisord_alive(sock):
        if time.monotonic() > deadline:
            raise RunnerError(f"supervisord (pid {pid}) still running after {timeout:.0f}s")
        time.sleep(0.2)
    print("runner: down")
    return 0 if done.returncode == 0 else done.returncode


def _max_stopwait(conf: Path) -> float:
    worst = 10.0
    for line in conf.read_text().splitlines():
        if line.startswith("stopwaitsecs="):
            worst = max(worst, float(line.split("=", 1)[1]))
    return worst


def cmd_status(args: argparse.Namespace) -> int:
    conf = _run_dir(args) / "supervisord.conf"
    if not conf.is_file():
        print(f"runner: never started ({conf.parent})")
        return 3
    return subprocess.run(_supervisorctl_cmd(conf, "status"), check=False).returncode


def cmd_ctl(args: argparse.Namespace) -> int:
    conf = _run_dir(args) / "supervisord.conf"
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.run(_supervisorctl_cmd(conf, *extra), check=False).returncode


def cmd_logs(args: argparse.Namespace) -> int:
    logs = _run_dir(args) / "logs"
    files = ([logs / f"{s}.log" for s in args.services] if args.services
             else sorted(p for p in logs.glob("*.log")))
    files = [f for f in files if f.exists()]
    if not files:
        print(f"runner: no logs in {logs}")
        return 1
    cmd = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(f) for f in files]
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return 0


COMMANDS = {"up": cmd_up, "down": cmd_down, "render": cmd_render, "check": cmd_check,
            "status": cmd_status, "logs": cmd_logs, "ctl": cmd_ctl}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except (RunnerError, ComposeError) as err:
        print(f"runner: error: {err}", file=sys.stderr)
        return 1
