"""Every Prometheus metric the services export, in one place (names are part of our API).

Each process serves its own registry on its own port (teacher: ``teacher.metrics_port`` +
group, trainer: ``train.metrics_port`` + global rank), bound to 127.0.0.1 unless configured.
One port per process is simpler and more robust than prometheus_client's multiprocess mode.

Teacher metrics, each labelled ``group``:

==========================================  =========  =============================================
name                                        type       meaning
==========================================  =========  =============================================
distill_teacher_ready                       gauge      1 while the model is loaded and the
                                                       rendezvous of the current generation is
                                                       published
distill_teacher_trainers_connected          gauge      trainers of the group joined to this
                                                       generation
distill_teacher_generation                  gauge      rendezvous generation (grows at every restart
                                                       of the group's link)
distill_teacher_batches_total               counter    batched forwards run
distill_teacher_tokens_total                counter    real (unpadded) tokens forwarded
distill_teacher_forward_seconds             histogram  time of one batched forward
distill_teacher_wait_seconds                histogram  time spent waiting for the group's requests
distill_teacher_transfer_seconds            histogram  time receiving requests / sending results,
                                                       label ``direction`` = recv | send
==========================================  =========  =============================================

Trainer metrics, each labelled ``rank``:

==========================================  =========  =============================================
distill_trainer_steps_total                 counter    optimizer steps done
distill_trainer_tokens_total                counter    real tokens trained on
distill_trainer_step_seconds                histogram  wall time of one optimizer step
distill_trainer_teacher_wait_seconds        histogram  time the step blocked on the teacher's answer
distill_trainer_loss                        gauge      last loss, label ``component`` =
                                                       total | kl | ce | align
distill_trainer_learning_rate               gauge      current learning rate
distill_trainer_grad_norm                   gauge      gradient norm before clipping
distill_trainer_tokens_per_second           gauge      real tokens this rank trained on per second
                                                       of the last step
distill_trainer_mfu                         gauge      model FLOPs utilisation of the last step:
                                                       the FLOPs of shared/flops.py done on the
                                                       rank's device (the student's training and
                                                       an in-process teacher's forward) per second,
                                                       over the device's bf16 peak; absent where
                                                       the peak is unknown (CPU)
distill_trainer_val_loss                    gauge      last validation loss, label ``model`` =
                                                       student | teacher
distill_trainer_teacher_reconnects_total    counter    times this rank rejoined its teacher group
                                                       after losing the teacher (crashed, hung,
                                                       restarted)
distill_trainer_teacher_reconnect_seconds   counter    seconds this rank spent without its teacher,
_total                                                 from the loss to the rejoin (training waited)
==========================================  =========  =============================================
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    exposition,
)

# The *_created series double every counter and histogram for no use in our dashboards.
disable_created_metrics()

# Latency buckets from 1 ms to ~5 min: covers a tiny CPU model and an 8B teacher at 9×2048.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)


class TeacherMetrics:
    """The teacher service's metrics for one group."""

    def __init__(self, group: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, g = self.registry, str(group)
        self.ready = Gauge("distill_teacher_ready", "1 when the teacher is ready to serve",
                           ["group"], registry=r).labels(g)
        self.trainers_connected = Gauge("distill_teacher_trainers_connected",
                                        "Trainers joined to the current generation",
                                        ["group"], registry=r).labels(g)
        self.generation = Gauge("distill_teacher_generation", "Rendezvous generation",
                                ["group"], registry=r).labels(g)
        self.batches = Counter("distill_teacher_batches", "Batched forwards run",
                               ["group"], registry=r).labels(g)
        self.tokens = Counter("distill_teacher_tokens", "Real tokens forwarded",
                              ["group"], registry=r).labels(g)
        self.forward_seconds = Histogram("distill_teacher_forward_seconds",
                                         "Time of one batched forward", ["group"],
                                         buckets=SECONDS_BUCKETS, registry=r).labels(g)
        self.wait_seconds = Histogram("distill_teacher_wait_seconds",
                                      "Time waiting for the group's requests", ["group"],
                                      buckets=SECONDS_BUCKETS, registry=r).labels(g)
        transfer = Histogram("distill_teacher_transfer_seconds",
                             "Time receiving requests (recv) and sending results (send)",
                             ["group", "direction"], buckets=SECONDS_BUCKETS, registry=r)
        self.recv_seconds = transfer.labels(g, "recv")
        self.send_seconds = transfer.labels(g, "send")


class TrainerMetrics:
    """The trainer service's metrics for one rank."""

    def __init__(self, rank: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, k = self.registry, str(rank)
        self.steps = Counter("distill_trainer_steps", "Optimizer steps done",
                             ["rank"], registry=r).labels(k)
        self.tokens = Counter("distill_trainer_tokens", "Real tokens trained on",
                              ["rank"], registry=r).labels(k)
        self.step_seconds = Histogram("distill_trainer_step_seconds",
                                      "Wall time of one optimizer step", ["rank"],
                                      buckets=SECONDS_BUCKETS, registry=r).labels(k)
        self.teacher_wait_seconds = Histogram("distill_trainer_teacher_wait_seconds",
                                              "Time a step blocked on the teacher", ["rank"],
                                              buckets=SECONDS_BUCKETS, registry=r).labels(k)
        loss = Gauge("distill_trainer_loss", "Last loss by component",
                     ["rank", "component"], registry=r)
        self.loss = {c: loss.labels(k, c) for c in ("total", "kl", "ce", "align")}
        self.learning_rate = Gauge("distill_trainer_learning_rate", "Current learning rate",
                                   ["rank"], registry=r).labels(k)
        self.grad_norm = Gauge("distill_trainer_grad_norm", "Gradient norm before clipping",
                               ["rank"], registry=r).labels(k)
        self.tokens_per_second = Gauge("distill_trainer_tokens_per_second",
                                       "Real tokens trained on per second in the last step",
                                       ["rank"], registry=r).labels(k)
        # No series until the first value: on a device without a known peak MFU is absent
        # (a 0 would read as an idle GPU).
        self._mfu = Gauge("distill_trainer_mfu", "Model FLOPs utilisation of the last step",
                          ["rank"], registry=r)
        self._rank = k
        val = Gauge("distill_trainer_val_loss", "Last validation loss", ["rank", "model"],
                    registry=r)
        self.val_loss = {m: val.labels(k, m) for m in ("student", "teacher")}
        # Incremented by the teacher link (shared/link) each time it rejoins after a lost
        # teacher: a run that survives a teacher crash says so here, not only in its log.
        self.teacher_reconnects = Counter("distill_trainer_teacher_reconnects",
                                          "Rejoins of the teacher group after losing the "
                                          "teacher", ["rank"], registry=r).labels(k)
        self.teacher_reconnect_seconds = Counter("distill_trainer_teacher_reconnect_seconds",
                                                 "Seconds spent without the teacher, from the "
                                                 "loss to the rejoin", ["rank"],
                                                 registry=r).labels(k)
        # NaN until first set: a 0 would read as a perfect loss at every start.
        for gauge in (*self.loss.values(), *self.val_loss.values()):
            gauge.set(float("nan"))

    def set_mfu(self, value: float) -> None:
        """The last step's MFU (the series appears with its first value)."""
        self._mfu.labels(self._rank).set(value)


class MetricsServer:
    """Serve ``/metrics`` from a registry and ``/healthz`` from a readiness callback.

    ``/healthz`` answers 200 only while ``is_ready()`` is true, so a container healthcheck and
    compose's ``depends_on: service_healthy`` wait for a loaded model and a published rendezvous.
    """

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1",
                 is_ready: Callable[[], bool] = lambda: True) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.startswith("/healthz"):
                    ok = is_ready()
                    body = b"ok\n" if ok else b"not ready\n"
                    self.send_response(200 if ok else 503)
                    self.send_header("Content-Type", "text/plain")
                else:
                    body = exposition.generate_latest(registry)
                    self.send_response(200)
                    self.send_header("Content-Type", exposition.CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes would flood the logs
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=f"metrics:{self.port}")
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict[str, float]:
    """``{'name{labels}': value}`` of one process's /metrics (tests, benchmarks, the demo)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
