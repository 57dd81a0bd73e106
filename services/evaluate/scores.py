"""The evaluation maths: perplexity, KL(teacher || student) and top-1 agreement per token.

Every figure is a sum over the *scored* positions (labels != IGNORE, the project's shifted-label
convention: ``labels[t]`` is the token to predict at position ``t``), kept as Python floats /
ints across batches, and divided once at the end, so a set's figures are token-weighted no
matter how its rows were batched:

    perplexity       = exp(sum of -log p_s(label) / tokens)
    kl               = sum over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), / tokens
    top1_agreement   = positions where argmax p_s == argmax p_t, / tokens

The log-softmaxes are taken in float32 from the full logits (whatever dtype the models ran in),
a bounded number of positions at a time, so memory stays at a few ``[chunk, vocab]`` float32
tensors (``CHUNK_ELEMENTS`` each) however long the rows are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shared.labels import IGNORE

if TYPE_CHECKING:
    from services.evaluate.heldout import HeldOutSet
    from services.evaluate.models import Model

CHUNK_ELEMENTS = 2**27  # float32 logits per chunk (512 MiB): 1,024 positions of a 128k vocab


@dataclass
class ScoreSums:
    """Running sums over scored positions (float64 in Python, so long sets lose no precision)."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, other: ScoreSums) -> None:
        self.tokens += other.tokens
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree

    def result(self) -> dict[str, Any]:
        """The per-token figures; ``None`` for all of them when nothing was scored."""
        if self.tokens == 0:
            return {"tokens": 0, "perplexity": None, "nll": None, "kl": None,
                    "top1_agreement": None}
        nll = self.nll / self.tokens
        return {"tokens": self.tokens, "perplexity": math.exp(nll), "nll": nll,
                "kl": self.kl / self.tokens, "top1_agreement": self.agree / self.tokens}


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``labels.flatten()``) of the positions that are scored."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


def score_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                 labels: torch.Tensor, chunk_positions: int | None = None) -> ScoreSums:
    """Sums of one batch: student NLL of ``labels``, KL(teacher || student), top-1 agreement.

    ``*_logits``: ``[B, T, V]`` (any float dtype, same vocabulary); ``labels``: ``[B, T]``.
    Passing the teacher's logits as both gives its own perplexity, KL 0 and agreement 1.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: the models must share one "
                         "vocabulary")
    if tuple(labels.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits "
                         f"{tuple(teacher_logits.shape)}")
    vocab = teacher_logits.shape[-1]
    chunk_positions = chunk_positions or max(1, CHUNK_ELEMENTS // vocab)
    flat_t = teacher_logits.reshape(-1, vocab)
    flat_s = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1).to(flat_t.device)
    where = scored_positions(labels).to(flat_t.device)
    sums = ScoreSums(tokens=int(where.numel()))
    if sums.tokens and int(flat_labels[where].max()) >= vocab:
        raise ValueError(f"a label id is >= the vocabulary size {vocab}: the data was tokenised "
                         "with another tokenizer than the teacher's")
    nll = kl = torch.zeros((), dtype=torch.float64, device=flat_t.device)
    agree = torch.zeros((), dtype=torch.long, device=flat_t.device)
    for start in range(0, sums.tokens, chunk_positions):
        index = where[start:start + chunk_positions]
        logp_t = torch.log_softmax(flat_t.index_select(0, index).float(), dim=-1)
        logp_s = torch.log_softmax(flat_s.index_select(0, index).float(), dim=-1)
        target = flat_labels.index_select(0, index)
        nll = nll - logp_s.gather(1, target[:, None]).double().sum()
        kl = kl + (logp_t.exp() * (logp_t - logp_s)).sum(dim=-1).double().sum()
        agree = agree + (logp_t.argmax(dim=-1) == logp_s.argmax(dim=-1)).sum()
    # one device -> host transfer per batch, not per chunk
    sums.nll, sums.kl, sums.agree = float(nll), float(kl), int(agree)
    return sums


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T, V]`` logits of a right-padded batch (the data loader's ``collate`` layout).

    Packed rows (``position_ids`` that restart at each document) go without a 2D mask, so that
    transformers and the student build the per-document causal mask from the positions; the
    padding then only follows the real tokens and is never scored.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    if "position_ids" in batch:
        return model(input_ids=ids, position_ids=batch["position_ids"].to(device),
                     use_cache=False).logits
    return model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                 use_cache=False).logits


def score_sets(models: list[Model], sets: list[HeldOutSet],
               batch_size: int) -> list[dict[str, Any]]:
    """One score row per (set, model); the teacher (``models[0]``) is scored against itself."""
    from tqdm.auto import tqdm

    total = sum(s.num_batches(batch_size) for s in sets)
    rows = []
    with tqdm(total=total, desc="score", unit=" batches", dynamic_ncols=True) as bar:
        for held in sets:
            sums = {m.name: ScoreSums() for m in models}
            bar.set_postfix(set=held.name, refresh=False)
            for batch in held.batches(batch_size):
                with torch.inference_mode():
                    reference = model_logits(models[0].module, batch)
                    for model in models:
                        logits = reference if model is models[0] else model_logits(model.module,
                                                                                   batch)
                        sums[model.name].add(score_logits(reference, logits, batch["labels"]))
                bar.update(1)
            base = sums[models[0].name].result()["perplexity"]
            for model in models:
                result = sums[model.name].result()
                ppl = result["perplexity"]
                rows.append({"set": held.name, "model": model.name, "role": model.role, **result,
                             "ppl_ratio": None if ppl is None or not base else ppl / base})
    return rows
