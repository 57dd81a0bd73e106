"""A step's efficiency in every output: the steps file, the progress line, Prometheus, the
run's totals. MFU where the device has a peak, absent (not 0) where it has none. The sums
over ranks go through a real one-rank Gloo group."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from prometheus_client import exposition

from conftest import free_port
from services.trainer.stats import (
    ProgressLogger,
    PrometheusStatLogger,
    RunTotals,
    StepStats,
)
from shared.metrics import TrainerMetrics


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def step(peak: float | None, step: int = 1, seconds: float = 2.0) -> StepStats:
    # 3 TFLOP of student training and 1 TFLOP of in-process teacher in 2 s on a 4 TFLOP/s
    # device: MFU 0.5; 1000 tokens: 500 tokens/s
    stats = StepStats(step=step, lr=1e-3, losses={"total": 1.0}, tokens=1000, teacher_wait=0.0,
                      seconds=seconds, start=0.0, flops=3e12, teacher_flops=1e12,
                      peak_flops=peak)
    stats.reduce(False, torch.device("cpu"))
    return stats


def test_the_steps_file_carries_tokens_per_second_flops_and_mfu():
    record = step(4e12).record()
    assert record["tokens_per_second"] == 500.0
    assert (record["flops"], record["teacher_flops"], record["mfu"]) == (3e12, 1e12, 0.5)
    assert "mfu" not in step(None).record()


def test_prometheus_has_no_mfu_series_without_a_peak():
    metrics = TrainerMetrics(0)
    logger = PrometheusStatLogger(metrics)
    logger.record(step(None))
    text = exposition.generate_latest(metrics.registry).decode()
    assert 'distill_trainer_tokens_per_second{rank="0"} 500.0' in text
    assert "distill_trainer_mfu{" not in text
    logger.record(step(4e12))
    text = exposition.generate_latest(metrics.registry).decode()
    assert 'distill_trainer_mfu{rank="0"} 0.5' in text


def test_the_progress_line_shows_mfu_only_with_a_peak(caplog):
    progress = ProgressLogger(rank=0, world_size=1, total_steps=2, log_every=1)
    with caplog.at_level(logging.INFO, logger="trainer"):
        progress.record(step(4e12))
        progress.record(step(None, step=2))
    first, second = (r.getMessage() for r in caplog.records)
    assert "| 500 tok/s | MFU 0.500 |" in first, first
    assert "| 500 tok/s | teacher wait" in second and "MFU" not in second, second


def test_the_runs_mfu_is_all_its_flops_over_all_its_seconds():
    totals = RunTotals()
    for seconds in (2.0, 6.0):   # 0.5 and then 1/6: the run's mean weighs by time
        totals.add(step(4e12, seconds=seconds))
    assert totals.mfu() == pytest.approx(8e12 / 8.0 / 4e12)
    cpu = RunTotals()
    cpu.add(step(None))
    assert cpu.mfu() is None
