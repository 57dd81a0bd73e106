"""Trainer service: distil the teacher into the hybrid RWKV student with DeepSpeed.

    torchrun --nproc-per-node N -m services.trainer --config CFG [--section.key value ...]
    python -m services.trainer --config CFG ...     # one process: a world of one

Rank r joins teacher group r // link.trainers_per_group and uses GPU
train.device_offset + LOCAL_RANK. Resumes from output_dir/checkpoints/latest when present.
Exit status: 0 done, 1 a known error (named on one line), 2 a config or launch error,
75 a peer rank was lost (services/trainer/peers.py). Under torchrun the error line is also
what its failure summary shows (services/trainer/errors.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import traceback

from services.trainer.errors import write_error_file
from services.trainer.peers import announce_failure
from shared.config import ConfigError, load_config

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def single_process_world() -> bool:
    """Without a launcher, set up the environment ``torchrun --nproc-per-node 1`` would
    (rank 0 of 1 on 127.0.0.1 and a free port); True when it did. A launch environment
    with only some of RANK, WORLD_SIZE and LOCAL_RANK is a ConfigError naming the rest."""
    present = [v for v in LAUNCH_VARIABLES if v in os.environ]
    if present and len(present) < len(LAUNCH_VARIABLES):
        missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
        raise ConfigError(f"launch environment: {', '.join(present)} set but "
                          f"{', '.join(missing)} not; start the trainer with torchrun (it sets "
                          f"all of {', '.join(LAUNCH_VARIABLES)}), or unset {', '.join(present)} "
                          "to run one process alone")
    if present:
        return False
    with socket.socket() as s:  # the process group's store binds it right after
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    return True


def fail(err: BaseException, message: str, status: int) -> int:
    """Say why this rank ends, everywhere it is looked for: the log, torchrun's summary, the
    peer ranks (which leave now, not after a collective's timeout)."""
    logging.getLogger("trainer").error("%s", message)
    write_error_file(message)
    announce_failure(err)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    args, rest = parser.parse_known_args(argv)
    launch_error = None
    try:
        single_process_world()
    except ConfigError as err:
        launch_error = err
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s trainer[{rank}] %(levelname)s %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if launch_error is not None:
            raise launch_error
        cfg = load_config(args.config, rest)
    except ConfigError as err:
        return fail(err, str(err), 2)
    from services.trainer.loop import train
    from shared.link import LinkError

    try:
        train(cfg)
    except (LinkError, FileNotFoundError, ValueError, RuntimeError) as err:
        return fail(err, f"{type(err).__name__}: {err}", 1)
    except BaseException as err:
        if not isinstance(err, SystemExit) or err.code not in (None, 0):
            write_error_file(f"{type(err).__name__}: {err}", traceback.format_exc())
        announce_failure(err)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
