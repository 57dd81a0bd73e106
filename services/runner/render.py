"""Turn compose services into supervisord programs: the local twin of the containers.

Each selected service becomes ``[program:<service>]`` whose command is the service's
``entrypoint + command`` and whose environment is the service's ``env_file`` + ``environment``,
exactly, except that container paths under a mount are mapped to host paths:

* a bind mount ``HOST:/target`` maps ``/target/...`` to ``HOST/...``;
* a named volume maps its target to ``RUN_DIR/volumes/<name>`` (e.g. the rendezvous volume);

and, for an image's own program (``/bin/prometheus``) that does not exist on this host, the
program of the same name on ``PATH`` (Debian's ``prometheus``). A service that has no command
of its own (it runs its image's default, like Grafana), or whose program this host lacks, is
skipped with a note. Services built from this repository (``build:``) run in the repository
with the runner's Python first on ``PATH``.

The stop semantics (signal, stop as a group) come from the container's supervisord.conf
(docker/supervisord.conf), so the two process managers stop programs the same way; the
restart policy maps to supervisord's (``no`` → no restart, ``on-failure[:N]`` → restart on a
non-zero exit, ``always``/``unless-stopped`` → always), and a program that cannot start goes
FATAL, which the event listener (docker/supervisor_listener.py) turns into a shutdown of the
whole stack, as a container stops.
"""
from __future__ import annotations

import configparser
import hashlib
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .compose import ComposeError, Healthcheck, Mount, Project

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINER_CONF = REPO_ROOT / "docker" / "supervisord.conf"
LISTENER = REPO_ROOT / "docker" / "supervisor_listener.py"
# Options of the container's [program:service] that local programs share verbatim.
SHARED_PROGRAM_OPTIONS = ("stopsignal", "stopasgroup", "killasgroup")
LOG_MAXBYTES = "50MB"
START_SECS = 1


@dataclass
class Program:
    """One service as a supervisord program."""

    name: str
    argv: list[str]
    environment: dict[str, str]
    directory: str
    autostart: bool
    autorestart: str
    startretries: int
    startsecs: int
    stopwaitsecs: int
    options: dict[str, str]
    depends_on: dict[str, str]
    healthcheck: Healthcheck | None
    healthcheck_argv: list[str] | None
    logfile: str


@dataclass
class Plan:
    """What ``up`` starts: the programs, and the services left out with the reason."""

    project: Project
    run_dir: Path
    programs: list[Program]
    skipped: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, list[Mount]] = field(default_factory=dict)

    @property
    def conf_path(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def socket_path(self) -> Path:
        return socket_path(self.run_dir)

    def program(self, name: str) -> Program:
        for p in self.programs:
            if p.name == name:
                return p
        raise KeyError(name)


def socket_path(run_dir: Path) -> Path:
    """The supervisord socket of a run dir (short enough for AF_UNIX's 108 bytes)."""
    path = Path(run_dir).resolve() / "supervisor.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return Path("/tmp") / f"llama2rwkv-supervisor-{digest}.sock"


def default_run_dir(project_dir: Path, files: list[Path]) -> Path:
    stem = Path(files[0]).name
    for suffix in (".yaml", ".yml"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return Path(project_dir) / "runs" / "local" / stem


def container_program_options(path: Path = CONTAINER_CONF) -> dict[str, str]:
    """The [program:service] options of the container's supervisord.conf."""
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
    if not parser.read(path):
        raise ComposeError(f"cannot read {path}")
    return dict(parser.items("program:service"))


class PathMap:
    """Container path → host path, from a service's mounts (longest target first)."""

    def __init__(self, mounts: list[Mount], run_dir: Path) -> None:
        pairs = []
        for m in mounts:
            host = m.source if m.kind == "bind" else str(run_dir / "volumes" / m.source)
            pairs.append((m.target.rstrip("/") or "/", host))
        self.pairs = sorted(pairs, key=lambda p: len(p[0]), reverse=True)

    def path(self, value: str) -> str:
        for target, host in self.pairs:
            if value == target:
                return host
            if value.startswith(target + "/"):
                return host + value[len(target):]
        return value

    def arg(self, value: str) -> str:
        """Map a whole argument, or the value of ``--flag=/path``."""
        mapped = self.path(value)
        if mapped != value:
            return mapped
        if value.startswith("-") and "=" in value:
            flag, _, rest = value.partition("=")
            return f"{flag}={self.path(rest)}"
        return value


def _restart_policy(restart: str) -> tuple[str, int]:
    """compose restart → (supervisord autorestart, startretries)."""
    if restart in ("no", "", "false"):
        return "false", 0
    if restart.startswith("on-failure"):
        _, _, n = restart.partition(":")
        return "unexpected", int(n) if n else 3
    if restart in ("always", "unless-stopped"):
        return "true", 3
    raise ComposeError(f"unknown restart policy {restart!r}")


def local_path_env(python: str = sys.executable) -> str:
    """PATH of the local programs: the runner's Python environment first."""
    bindir = str(Path(python).parent)
    rest = [p for p in os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
            if p and p != bindir]
    return os.pathsep.join([bindir] + rest)


def _resolve_program(argv0: str, builds: bool, path_env: str) -> str | None:
    """Host program for argv[0]; None when this host has none."""
    if "/" in argv0:
        if os.path.isfile(argv0) and os.access(argv0, os.X_OK):
            return argv0
        if builds:
            return None
        return shutil.which(os.path.basename(argv0), path=path_env)
    return argv0 if shutil.which(argv0, path=path_env) else None


def build_plan(project: Project, run_dir: Path | None = None, services: list[str] | None = None,
               profiles: list[str] | None = None, with_deps: bool = True,
               extra_args: dict[str, list[str]] | None = None,
               path_env: str | None = None, resolve: bool = True) -> Plan:
    """Select, interpolate and map the services into supervisord programs.

    ``resolve=False`` (pre-flight checks for Docker) leaves programs unresolved: this host
    need not have ``torchrun`` or ``prometheus`` for the containers to have them.
    """
    run_dir = Path(run_dir or default_run_dir(project.project_dir, project.files)).resolve()
    path_env = path_env or local_path_env()
    template = container_program_options()
    shared = {k: template[k] for k in SHARED_PROGRAM_OPTIONS if k in template}
    extra_args = dict(extra_args or {})
    plan = Plan(project=project, run_dir=run_dir, programs=[])
    names = project.select(services, profiles, with_deps)
    for name in extra_args:
        if name not in names:
            raise ComposeError(f"--extra-args for {name!r}, which is not selected")
    for name in names:
        raw = project.raw(name)
        if raw.get("command") is None and raw.get("entrypoint") is None:
            plan.skipped[name] = "runs its image's default command (no command in compose)"
            continue
        svc = project.service(name)
        pm = PathMap(svc.mounts, run_dir)
        argv = [pm.arg(a) for a in (svc.argv or [])]
        if not argv:
            plan.skipped[name] = "empty command"
            continue
        program = _resolve_program(argv[0], svc.builds, path_env) if resolve else argv[0]
        if program is None:
            if svc.builds:
                raise ComposeError(f"service {name}: {argv[0]!r} is not on PATH ({path_env})")
            plan.skipped[name] = (f"{argv[0]!r} (from its image) is not installed on this host")
            continue
        argv[0] = program
        argv += [pm.arg(a) for a in extra_args.get(name, [])]  # mapped like compose args
        env = {k: pm.path(v) for k, v in svc.environment.items()}
        autorestart, retries = _restart_policy(svc.restart)
        if "STOP_WAIT_SECS" in env:
            stopwait = int(env["STOP_WAIT_SECS"])
        else:
            stopwait = max(1, int(svc.stop_grace_period) - 2)
        health_argv = None
        if svc.healthcheck:
            test = [pm.arg(t) for t in svc.healthcheck.test]
            if test[0] == "CMD":
                health_argv = test[1:]
            elif test[0] == "CMD-SHELL":
                health_argv = ["/bin/sh", "-c", " ".join(test[1:])]
        directory = str(project.project_dir)
        if svc.working_dir and not svc.builds:
            directory = pm.path(svc.working_dir)
        plan.mounts[name] = svc.mounts
        plan.programs.append(Program(
            name=name, argv=argv, environment=env, directory=directory,
            autostart=not svc.depends_on, autorestart=autorestart, startretries=retries,
            startsecs=START_SECS, stopwaitsecs=stopwait, options=dict(shared),
            depends_on={d: c for d, c in svc.depends_on.items()},
            healthcheck=svc.healthcheck, healthcheck_argv=health_argv,
            logfile=str(run_dir / "logs" / f"{name}.log")))
    started = {p.name for p in plan.programs}
    for p in plan.programs:
        missing = [d for d in p.depends_on if d not in started]
        for d in missing:
            # A dependency that does not run locally (skipped) cannot gate the start.
            del p.depends_on[d]
        if not p.depends_on:
            p.autostart = True
    return plan


# --------------------------------------------------------------------------- conf text
_COMMENT_HAZARD = re.compile(r"\s[;#]")


def conf_quote_arg(arg: str) -> str:
    """shlex-quote one argument so supervisord's config parser leaves it intact.

    supervisord reads its conf with inline comments (`` ;`` and `` #``) and ``%`` expansion, so
    whitespace must never precede ``;``/``#`` (quote the pieces separately) and ``%`` doubles.
    """
    if "\n" in arg or "\r" in arg:
        raise ComposeError(f"a newline in a command argument cannot be written: {arg!r}")
    quoted = shlex.quote(arg)
    if _COMMENT_HAZARD.search(quoted):
        pieces = re.split(r"(?=[;#])", arg)
        quoted = "".join(shlex.quote(p) for p in pieces if p)
    return quoted.replace("%", "%%")


def conf_command(argv: list[str]) -> str:
    return " ".join(conf_quote_arg(a) for a in argv)


def conf_environment(env: dict[str, str]) -> str:
    """``KEY="value",...`` in the form supervisord's (non-POSIX shlex) parser reads back."""
    parts = []
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ComposeError(f"environment variable name {key!r} cannot be written")
        if "\n" in value or "\r" in value:
            raise ComposeError(f"environment {key}: a newline cannot be written")
        if value and (value[0] in "'\"" or value[-1] in "'\""):
            raise ComposeError(f"environment {key}: a value starting or ending with a quote "
                               "cannot be written for supervisord")
        if '"' not in value:
            q = f'"{value}"'
        elif "'" not in value:
            q = f"'{value}'"
        else:
            raise ComposeError(f"environment {key}: both quote kinds in one value")
        if _COMMENT_HAZARD.search(q):
            raise ComposeError(f"environment {key}: ' ;' or ' #' cannot be written for supervisord")
        parts.append(f"{key}={q}".replace("%", "%%"))
    return ",".join(parts)


def render_conf(plan: Plan, foreground: bool = False, python: str = sys.executable,
                path_env: str | None = None) -> str:
    """The supervisord.conf text of a plan."""
    run = plan.run_dir
    path_env = path_env or local_path_env(python)
    lines = [
        "; Rendered by `python -m services.runner` from "
        + ", ".join(str(f) for f in plan.project.files),
        "; Do not edit: change the compose file and render again.",
        "",
        "[unix_http_server]",
        f"file={plan.socket_path}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"nodaemon={'true' if foreground else 'false'}",
        f"logfile={run / 'supervisord.log'}",
        f"logfile_maxbytes={LOG_MAXBYTES}",
        "logfile_backups=3",
        f"pidfile={run / 'supervisord.pid'}",
        f"childlogdir={run / 'logs'}",
        f"directory={plan.project.project_dir}",
        f"identifier=llama2rwkv-{hashlib.sha1(str(run).encode()).hexdigest()[:12]}",
        f"environment={conf_environment({'PATH': path_env})}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{plan.socket_path}",
        "",
    ]
    for p in plan.programs:
        lines += [
            f"[program:{p.name}]",
            f"command={conf_command(p.argv)}",
            f"directory={p.directory}",
        ]
        if p.environment:
            lines.append(f"environment={conf_environment(p.environment)}")
        lines += [
            f"autostart={'true' if p.autostart else 'false'}",
            f"autorestart={p.autorestart}",
            "exitcodes=0",
            f"startsecs={p.startsecs}",
            f"startretries={p.startretries}",
            *(f"{k}={v}" for k, v in p.options.items()),
            f"stopwaitsecs={p.stopwaitsecs}",
            f"stdout_logfile={p.logfile}",
            f"stdout_logfile_maxbytes={LOG_MAXBYTES}",
            "stdout_logfile_backups=3",
            "redirect_stderr=true",
            "",
        ]
    listener = [python, str(LISTENER), "--on", "fatal",
                "--status-file", str(run / "exit-status.json")]
    lines += [
        "[eventlistener:stop-on-fatal]",
        f"command={conf_command(listener)}",
        "events=PROCESS_STATE_FATAL",
        "autorestart=true",
        "stdout_logfile=NONE",
        f"stderr_logfile={run / 'logs' / 'stop-on-fatal.log'}",
        f"stderr_logfile_maxbytes={LOG_MAXBYTES}",
        "",
    ]
    return "\n".join(lines)


def write_conf(plan: Plan, foreground: bool = False) -> Path:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "logs").mkdir(exist_ok=True)
    plan.conf_path.write_text(render_conf(plan, foreground=foreground))
    return plan.conf_path
