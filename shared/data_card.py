"""The dataset card: the contract between the data job (writer) and every reader of its output.

``python -m services.data`` writes ``card.json`` last into its output directory (a directory
without one is an interrupted run); the trainer's loader (shared/data_loader.py), the demo and
the evaluation read it through :func:`read_card`. Fields a reader may rely on, for
``format == CARD_FORMAT``:

- ``format``: ``CARD_FORMAT``; a reader refuses any other value.
- ``command``: the data command that made the directory (quoted in error messages).
- ``tokenizer``: ``path``, ``fingerprint`` (shared/fingerprint.py), ``vocab_size``,
  ``pad_token_id`` (what batches are padded with; masks come from lengths, never from it).
- ``max_len``, ``packed`` (rows hold several documents; ``position_ids`` column), ``columns``,
  ``labels`` (shared/labels.py's convention), ``bucket_width``, ``seed``.
- ``splits``: ``{split: {samples, tokens, trained_tokens, buckets: [{name, path, min_len,
  max_len, samples, tokens}]}}``; a bucket's ``path`` (relative, a ``datasets`` save_to_disk
  directory) is ``None`` when it is empty.
- ``stats``: counts of the run (``samples_in``, ``tokens``, ``seconds``...), informational.

Changing what a field means changes ``CARD_FORMAT``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "card.json"
CARD_FORMAT = "llama2rwkv-data/1"
DATA_COMMAND = "python -m services.data"


class FingerprintMismatch(ValueError):
    """The dataset was tokenised with a different tokenizer than the teacher's."""


def read_card(dataset_dir: str | Path) -> dict[str, Any]:
    """The card of a prepared dataset; a clear error when it is missing or of another format."""
    path = Path(dataset_dir) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset_dir} has no {CARD_NAME}: not prepared by `{DATA_COMMAND}`, "
            "or the run was interrupted (the card is written last); re-run the data command")
    card = json.loads(path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path}: card format {card.get('format')!r}, this reader reads "
                         f"{CARD_FORMAT!r}")
    return card


def write_card(output_dir: str | Path, card: dict[str, Any]) -> None:
    """Write the card (the data job's last step)."""
    text = json.dumps(card, indent=2, ensure_ascii=False) + "\n"
    (Path(output_dir) / CARD_NAME).write_text(text)


def check_tokenizer_fingerprint(dataset_dir: str | Path, expected: str,
                                expected_from: str = "the teacher") -> dict[str, Any]:
    """Refuse (FingerprintMismatch) a dataset whose tokenizer differs from ``expected``; return
    its card."""
    card = read_card(dataset_dir)
    have = card["tokenizer"]["fingerprint"]
    if have != expected:
        raise FingerprintMismatch(
            f"dataset {dataset_dir} was tokenised with tokenizer fingerprint {have} "
            f"({card['tokenizer'].get('path')}), but {expected_from} uses fingerprint {expected}: "
            "the token ids would mean different tokens and the distillation loss would be silently "
            "wrong. Fix: re-run the data command with --tokenizer set to the teacher's model "
            f"directory (this dataset was made by: {card.get('command')}), or point the trainer at "
            "a dataset prepared with the teacher's tokenizer.")
    return card
