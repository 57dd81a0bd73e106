"""A trainer-side process for the link tests: joins a group, runs a scenario, saves results.

    python tests/link_worker.py CONFIG GROUP INDEX SCENARIO OUT_DIR

Results are written with safetensors (inputs and outputs of every step) and a JSON file of
timestamps, so the test process can compare them with a direct forward.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.config import load_config
from shared.fingerprint import tokenizer_fingerprint
from shared.link import LinkError, RequestSpec, TeacherClient

SPECS = {
    "bf16": RequestSpec(logits="bf16"),
    "topk": RequestSpec(logits="topk", top_k=8, temperature=2.0),
    "fp32": RequestSpec(logits="fp32", hidden_layers=[1, 4]),
    "hidden": RequestSpec(logits="none", hidden_layers=[0, 1, 3, 4]),
}


def busy(seconds: float) -> None:
    """Real CPU work (not sleep) standing in for a training step."""
    end = time.perf_counter() + seconds
    a = torch.randn(128, 128)
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def main() -> int:
    config, group, index, scenario, out = sys.argv[1:6]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    group, index = int(group), int(index)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(config)
    device = torch.device(os.environ.get("LINK_DEVICE", "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    client = TeacherClient(cfg.link, group, index, device,
                           tokenizer_fingerprint(cfg.teacher.model_path),
                           vocab_size=int(sys.argv[6]) if len(sys.argv) > 6 else None,
                           on_reconnect=lambda s: print(f"RECONNECTED after {s:.1f}s", flush=True))
    try:
        client.connect()
    except LinkError as err:
        print(f"LINK_ERROR {err}", flush=True)
        return 3
    gen = torch.Generator().manual_seed(100 * group + index)
    times = []
    try:
        if scenario in SPECS or scenario == "all":
            names = list(SPECS) if scenario == "all" else [scenario]
            for step, name in enumerate(names * 2):
                length = 5 + 3 * step + index  # lengths vary across steps and trainers
                ids = torch.randint(0, 500, (2, length), generator=gen)
                lengths = torch.tensor([length, max(1, length - 2 - step)])
                extra = {}
                if step >= len(names):  # second pass: row 0 packs two documents
                    cut = length // 2
                    positions = torch.arange(length).repeat(2, 1)
                    positions[0, cut:] -= cut
                    extra["positions"] = positions
                result = client.request(ids, lengths, SPECS[name], extra.get("positions")).result()
                result = {k: v.cpu() for k, v in result.items()}
                save_file({"ids": ids, "lengths": lengths, **extra, **result},
                          str(out_dir / f"step{step}-{name}.safetensors"))
        elif scenario == "overlap":
            spec = RequestSpec(logits="bf16")
            batch = lambda: (torch.randint(0, 500, (2, 16), generator=gen),  # noqa: E731
                             torch.tensor([16, 16]))
            handle = client.request(*batch(), spec)
            for _ in range(4):
                handle.result()
                nxt = client.request(*batch(), spec)     # ask for step k+1 ...
                t0 = time.time()
                busy(1.0)                                # ... while training on step k
                t1 = time.time()
                times.append({"compute": [t0, t1], "ready_after_compute": nxt.ready(),
                              "teacher_forward": list(nxt.teacher_forward or [])})
                nxt.result()
                times[-1]["teacher_forward"] = list(nxt.teacher_forward)
                handle = nxt
        elif scenario == "hold":   # the same request over and over until out_dir/stop exists
            ids, lengths = torch.randint(0, 500, (1, 8), generator=gen), torch.tensor([8])
            first = client.request(ids, lengths, RequestSpec()).result()["logits"].clone()
            print("READY", flush=True)
            t0 = time.time()
            while not (out_dir / "stop").exists():
                try:
                    handle = client.request(ids, lengths, RequestSpec())
                    time.sleep(0.02)  # a request in flight while the peer may die
                    answer = handle.result()["logits"]
                except LinkError as err:
                    print(f"LINK_ERROR after {time.time() - t0:.1f}s: {err}", flush=True)
                    return 3
                if not torch.equal(answer, first):
                    print("MISMATCH: the same ids gave another answer", flush=True)
                    return 4
        elif scenario == "bad":
            errors = []
            for ids, lengths, pos in (
                    (torch.tensor([[1, 2, 100000]]), torch.tensor([3]), None),
                    (torch.zeros(1, 10**6, dtype=torch.long), torch.tensor([10**6]), None),
                    (torch.tensor([[1, 2, 3]]), torch.tensor([3]), torch.tensor([[0, 1]]))):
                try:
                    client.request(ids, lengths, RequestSpec(), pos)
                    errors.append("accepted")
                except LinkError as err:
                    errors.append(str(err))
            (out_dir / "errors.json").write_text(json.dumps(errors))
    finally:
        (out_dir / "times.json").write_text(json.dumps(times))
    client.close()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
