"""Host syncs of the trainer's optimizer steps on a GPU, by call site (torch's sync debug mode).

    python tests/sync_probe.py OUT.json --config CFG [--section.key value ...]

Builds the trainer in this process as a world of one, trains one step to warm up, then
STEPS steps with ``torch.cuda.set_sync_debug_mode("warn")``, and writes ``{site: syncs}`` to
OUT.json. A site is "innermost project line <- the line that synchronised" (project: this
repository outside its virtualenv), so a sync inside DeepSpeed or transformers is charged to
the line of ours that led to it.
"""
from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


def site(stack: list[traceback.FrameSummary]) -> str:
    ours = [(path, f.lineno) for f in stack
            if (path := Path(f.filename).resolve()).is_relative_to(ROOT)
            and ".venv" not in path.parts and path.name != Path(__file__).name]
    mine = f"{ours[-1][0].relative_to(ROOT)}:{ours[-1][1]}" if ours else "?"
    return f"{mine} <- {Path(stack[-1].filename).name}:{stack[-1].lineno}"


def main() -> None:
    import torch

    from services.trainer import loop
    from services.trainer.__main__ import single_process_world
    from shared.config import load_config

    out, args = Path(sys.argv[1]), sys.argv[2:]
    single_process_world()
    cfg = load_config(args[1], args[2:]) if args[:1] == ["--config"] else load_config(None, args)
    run = loop.start(cfg)
    loop.train_step(run)   # first step: lazy initialisation, allocator growth
    torch.cuda.synchronize()
    syncs: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if "synchroniz" in str(message):
            stack = traceback.extract_stack()[:-1]
            while stack and stack[-1].filename == warnings.__file__:  # the warning machinery
                stack.pop()
            syncs[site(stack)] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(STEPS):
            loop.train_step(run)
        torch.cuda.set_sync_debug_mode("default")
    out.write_text(json.dumps(dict(syncs), indent=1))
    run.close()


if __name__ == "__main__":
    main()
