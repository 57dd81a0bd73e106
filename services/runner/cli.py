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
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .compose import ComposeError, Project
from .errors import RunnerError
from .preflight import preflight, teacher_model_paths
from .render import Plan, build_plan, default_run_dir, socket_path, write_conf
from .supervisor_control import (
    exit_record,
    max_stopwait,
    pid_alive,
    read_pid,
    rpc_proxy,
    start_dependents,
    stopped_message,
    supervisorctl_cmd,
    supervisord_alive,
    supervisord_cmd,
)

# This module owns the command line: its arguments, the plan they select, and the commands.
# Talking to supervisord is supervisor_control's, the host checks preflight's;
# rpc_proxy and supervisord_alive stay importable from here, where callers found them.
__all__ = ["RunnerError", "main", "rpc_proxy", "supervisord_alive"]


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


# --------------------------------------------------------------------------- commands
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
        proc = subprocess.Popen(supervisord_cmd(conf))
    else:
        done = subprocess.run(supervisord_cmd(conf), check=False)
        if done.returncode != 0:
            raise RunnerError(f"supervisord failed to start (see {plan.run_dir}/supervisord.log)")
    deadline = time.monotonic() + 30
    while not supervisord_alive(sock):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RunnerError(stopped_message(plan))
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
    record = exit_record(plan.run_dir)
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
    pid = read_pid(run_dir)
    if not conf.is_file() or not supervisord_alive(sock):
        print(f"runner: not running ({run_dir})")
        return 0
    done = subprocess.run(supervisorctl_cmd(conf, "shutdown"), check=False)
    timeout = args.timeout if args.timeout is not None else max_stopwait(conf) + 30
    deadline = time.monotonic() + timeout
    while pid_alive(pid) or supervisord_alive(sock):
        if time.monotonic() > deadline:
            raise RunnerError(f"supervisord (pid {pid}) still running after {timeout:.0f}s")
        time.sleep(0.2)
    print("runner: down")
    return 0 if done.returncode == 0 else done.returncode


def cmd_status(args: argparse.Namespace) -> int:
    conf = _run_dir(args) / "supervisord.conf"
    if not conf.is_file():
        print(f"runner: never started ({conf.parent})")
        return 3
    return subprocess.run(supervisorctl_cmd(conf, "status"), check=False).returncode


def cmd_ctl(args: argparse.Namespace) -> int:
    conf = _run_dir(args) / "supervisord.conf"
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.run(supervisorctl_cmd(conf, *extra), check=False).returncode


def cmd_logs(args: argparse.Namespace) -> int:
    logs = _run_dir(args) / "logs"
    files = ([logs / f"{s}.log" for s in args.services] if args.services
             else sorted(p for p in logs.glob("*.log")))
    files = [f for f in files if f.exists()]
    if not files:
        print(f"runner: no logs in {logs}")
        return 1
    cmd = (["tail", "-n", str(args.lines)] + (["-F"] if args.follow else [])
           + [str(f) for f in files])
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
