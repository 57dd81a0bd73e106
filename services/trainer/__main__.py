"""Trainer service: distil the teacher into the hybrid RWKV student with DeepSpeed.

    torchrun --nproc-per-node N -m services.trainer --config CFG [--section.key value ...]

Rank r joins teacher group r // link.trainers_per_group and uses GPU
train.device_offset + LOCAL_RANK. Resumes from output_dir/checkpoints/latest when present.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from services.trainer.peers import announce_failure
from shared.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    args, rest = parser.parse_known_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s trainer[{rank}] %(levelname)s %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as err:
        logging.getLogger("trainer").error("%s", err)
        announce_failure(err)
        return 2
    from services.trainer.loop import train
    from shared.link import LinkError

    try:
        train(cfg)
    except (LinkError, FileNotFoundError, ValueError, RuntimeError) as err:
        logging.getLogger("trainer").error("%s: %s", type(err).__name__, err)
        announce_failure(err)  # the other ranks leave now, not after a collective's timeout
        return 1
    except BaseException as err:
        announce_failure(err)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
