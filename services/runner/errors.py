"""The runner's two errors, each reported to the user as one line with exit status 1.

They live apart from the modules that raise them because several do: the compose reader
(:mod:`.interpolate`, :mod:`.normalise`, :mod:`.compose`, :mod:`.render`) raises
:class:`ComposeError`, the command line (:mod:`.cli`) and the supervisord control
(:mod:`.supervisor_control`) raise :class:`RunnerError`, and :func:`.cli.main` reports both.
"""
from __future__ import annotations


class ComposeError(ValueError):
    """A compose file, .env file or interpolation that cannot be used."""


class RunnerError(RuntimeError):
    """A failure reported to the user as one line, exit status 1."""
