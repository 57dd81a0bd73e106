"""Teacher service: load a causal LM on one GPU and serve a group of trainers.

    python -m services.teacher --config configs/demo.yaml --group 0 [--device-id 6]
                               [--section.key value ...]

SIGTERM/SIGINT: the batch in flight is finished and answered, then the process exits 0.
One teacher per group: a second one for the same group and rendezvous directory is refused.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from shared.config import Config, ConfigError, load_config
from shared.link import LinkError, TeacherModel, TeacherServer
from shared.link.rendezvous import GroupRendezvous
from shared.metrics import MetricsServer, TeacherMetrics

log = logging.getLogger("teacher")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--group", type=int, default=0, help="teacher group served")
    parser.add_argument("--device-id", type=int, default=None,
                        help="GPU index (overrides teacher.device_id)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s teacher[{args.group}] %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    if args.device_id is not None:
        cfg.teacher.device_id = args.device_id
    try:
        claim = GroupRendezvous(cfg.link.rendezvous_dir, args.group).claim()
    except (LinkError, OSError) as err:
        log.error("%s", err)
        return 2
    try:
        return serve(cfg, args.group)
    finally:
        claim.close()


def serve(cfg: Config, group: int) -> int:
    """Metrics, the model, the link: until SIGTERM/SIGINT."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        # Only the flag: the handler runs in the main thread wherever it was, and a lock it
        # holds there (logging's, an Event's) would be taken again here. Nothing in the main
        # thread waits on ``stop`` (shared.link.server.wait_until says why).
        received.append(signum)
        stop.set()

    def say_when_stopping() -> None:
        stop.wait()
        log.info("signal %s: finishing the batch in flight, then exiting",
                 received[0] if received else "?")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notice = threading.Thread(target=say_when_stopping, daemon=True, name="stop-notice")
    notice.start()

    metrics = TeacherMetrics(group)
    state = {"server": None}
    http = None
    if cfg.teacher.metrics_port:
        port = cfg.teacher.metrics_port + group
        try:
            http = MetricsServer(metrics.registry, port, cfg.teacher.metrics_host,
                                 is_ready=lambda: bool(state["server"] and state["server"].ready))
        except OSError as err:
            log.error("cannot serve metrics on %s:%d (%s): is another teacher of group %d "
                      "running? Set teacher.metrics_port", cfg.teacher.metrics_host, port, err,
                      group)
            return 2
        log.info("metrics on http://%s:%d/metrics", cfg.teacher.metrics_host, http.port)
    try:
        teacher = TeacherModel.load(cfg.teacher)
    except (FileNotFoundError, RuntimeError, OSError) as err:
        log.error("cannot load the teacher: %s", err)
        return 2
    server = TeacherServer(teacher, cfg.link, cfg.teacher, group, metrics)
    state["server"] = server
    try:
        server.serve(stop)
    except LinkError as err:
        log.error("%s", err)
        return 1
    finally:
        if http is not None:
            http.close()
        if stop.is_set():
            notice.join(5)  # its line before ours
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
