"""Where a failing trainer rank says why: torchrun's failure summary.

A failed torchrun job ends with the agent's summary of its failed ranks (``ChildFailedError``):
per rank its exit code, its error file and what that file says. The agent names the file
in each worker's ``TORCHELASTIC_ERROR_FILE``; a rank that writes nothing there is shown as
"error_file: <N/A>" with a link to the docs, and the reason is somewhere earlier in the
log. So a rank that ends with an error writes the one line it logs there (an unexpected
exception: its traceback), in the format of torch.distributed.elastic's ``ErrorHandler``
(which ``@record`` would write), and the summary's last screen shows it. Without torchrun
there is no such file and nothing is written.
"""
from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("trainer")


def write_error_file(message: str, traceback_text: str | None = None) -> None:
    """Leave ``message`` (and the traceback, if any) where torchrun's summary reads it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The summary prints py_callstack as the rank's "traceback": our one line where the error
    # is a known one. The dict form (not a bare string) keeps the agent's exit-code override
    # working without its "new message format" warning.
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": traceback_text or message,
                                      "timestamp": str(int(time.time()))}}}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as err:  # the log line stays; only the summary loses it
        log.debug("could not write torchrun's error file %s: %s", path, err)
