#!/usr/bin/env python3
"""supervisord event listener: shut supervisord down when a program goes FATAL (or exits).

supervisord keeps running when a program goes FATAL (it could not be started); in a container
that leaves a live container with a dead service, and in a local stack a half-started one.
This listener, subscribed to PROCESS_STATE_FATAL (and PROCESS_STATE_EXITED with ``--on
exited``), writes the first such event and the program's exit status as JSON to
``--status-file`` and sends SIGTERM to supervisord (its parent), which stops every program
(TERM to the process group, KILL after stopwaitsecs) and exits. The container entrypoint then
exits with that status.

Protocol: https://supervisord.org/events.html (READY, header line, payload, RESULT 2 OK).
Standard library only; supervisor's XML-RPC is used, when reachable, for the exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def parse_tokens(line: str) -> dict[str, str]:
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def exit_status(group: str, name: str, expected: bool) -> int:
    """The program's exit status from supervisord's XML-RPC, else 0/1 from ``expected``."""
    try:
        from supervisor import childutils

        rpc = childutils.getRPCInterface(os.environ)
        info = rpc.supervisor.getProcessInfo(f"{group}:{name}")
        status = int(info.get("exitstatus", 0))
        return 1 if status < 0 else status  # < 0: killed by a signal
    except Exception:  # noqa: BLE001 - the status is a courtesy; stopping is what matters
        return 0 if expected else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--on", default="fatal",
                    help="comma list of states that stop supervisord: fatal, exited")
    ap.add_argument("--status-file", default="",
                    help="write {event, process, exit_status} here (first event only)")
    args = ap.parse_args(argv)
    on = {s.strip().lower() for s in args.on.split(",") if s.strip()}
    stdin, stdout = sys.stdin, sys.stdout
    stopping = False
    while True:
        stdout.write("READY\n")
        stdout.flush()
        header_line = stdin.readline()
        if not header_line:
            return 0  # supervisord went away
        header = parse_tokens(header_line)
        payload = stdin.read(int(header.get("len", "0")))
        event = header.get("eventname", "")
        fields = parse_tokens(payload.split("\n", 1)[0])
        name = fields.get("processname", "?")
        group = fields.get("groupname", name)
        status = None
        if event == "PROCESS_STATE_FATAL" and "fatal" in on:
            status = 1
        elif event == "PROCESS_STATE_EXITED" and "exited" in on:
            status = exit_status(group, name, fields.get("expected") == "1")
        if status is not None and not stopping:
            stopping = True
            record = {"event": event, "process": name, "exit_status": status,
                      "time": time.time()}
            if args.status_file:
                tmp = args.status_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(record, f)
                os.replace(tmp, args.status_file)
            sys.stderr.write(f"stop-on-{event.rsplit('_', 1)[-1].lower()}: {name} "
                             f"({event}, status {status}): stopping supervisord\n")
            sys.stderr.flush()
            os.kill(os.getppid(), signal.SIGTERM)
        stdout.write("RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
