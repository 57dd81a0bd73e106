#!/usr/bin/env python3
"""Container entrypoint: run the container's command under supervisord; exit with its status.

    ENTRYPOINT ["python", "/opt/llama2rwkv/docker/entrypoint.py", "--"]
    CMD / compose `command:` = the service's command, e.g. python -m services.teacher ...

supervisord (docker/supervisord.conf) runs the command as its one program, sends its output to
the container's stdout/stderr, stops it as a process group (torchrun and its ranks) on
SIGTERM, and its event listener stops supervisord when the program exits or goes FATAL. This
wrapper forwards Docker's signals to supervisord, reaps orphans (it may be PID 1), and exits
with the program's status (written by the listener), so Docker's restart policy and
`docker compose ps` see the service's own exit code.

Standard library only.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.stderr.write("usage: entrypoint.py [--] COMMAND [ARG...]\n"
                         "(the container's command is the service to run)\n")
        return 2
    conf = Path(os.environ.get("SUPERVISORD_CONF", HERE / "supervisord.conf"))
    run_dir = tempfile.mkdtemp(prefix="supervisor-")
    env = dict(os.environ)
    env["SERVICE_COMMAND"] = shlex.join(argv)
    env["SUPERVISOR_RUN_DIR"] = run_dir
    env["SUPERVISOR_PYTHON"] = sys.executable
    env.setdefault("STOP_WAIT_SECS", "8")  # below Docker's default 10 s grace period
    status_file = Path(run_dir) / "exit-status.json"

    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                            env=env)

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)

    code = 1
    while True:  # reap every child (orphans come to PID 1); stop when supervisord is gone
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(wait_status)
            proc.returncode = code
            break
    if code < 0:
        code = 128 - code
    try:
        record = json.loads(status_file.read_text())
        code = int(record["exit_status"])
    except (OSError, ValueError, KeyError):
        pass  # stopped from outside (docker stop): supervisord's own status
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
