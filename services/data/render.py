"""Chat rendering and label masking: which tokens of a conversation the student is trained on.

Trained targets are the assistant turns' content plus the end-of-turn token that follows it
(``<|eot_id|>``, ``<|im_end|>``, ``</s>`` ...), nothing else: not the role headers, not the
user turns, not the system prompt, not the separators a template puts after end-of-turn.

We do not rely on ``{% generation %}`` markers (real Llama-3 / Qwen templates lack them).
Instead the conversation is rendered once in full and, for each assistant turn k, once up to
the generation prompt before it (messages[:k] + add_generation_prompt). When that prefix is a
string prefix of the full render (the prefix property; we check it) the assistant turn starts
right after it; the content is then located from there, and tokens are mapped to characters
with the tokenizer's offsets, so BPE merges across a boundary cannot shift the mask. If a
template breaks the prefix property we fall back to searching the content after the previous
turn and count it (``prefix_fallbacks`` in the card).

This module runs in the tokenisation workers: it imports only tokenizers, jinja (through
transformers' template compiler, which does not import torch), numpy and shared.labels.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.labels import IGNORE

# The reference implementation's plain rendering ("User : ... Assistant : ..."), made a
# template so that it goes through exactly the same masking code as real chat templates. An
# EOS closes each assistant turn so the student learns where to stop.
PLAIN_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ 'Assistant : ' + m['content'] | trim + eos_token + '\n\n' }}"
    "{% elif m['role'] == 'system' %}{{ 'System : ' + m['content'] | trim + '\n\n' }}"
    "{% else %}{{ 'User : ' + m['content'] | trim + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant : ' }}{% endif %}"
)


class Drop(Exception):
    """A record we skip and count under ``reason`` (never fatal)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass
class ChatEncoding:
    ids: np.ndarray          # int32 token ids of the whole rendered conversation
    targets: np.ndarray      # bool: token i is a training target (predicted from position i-1)
    turn_ends: list[int]     # index of the last target token of each assistant turn
    prefix_fallback: bool    # the template broke the prefix property for some turn


def validate_messages(obj: Any) -> list[dict[str, str]]:
    """UltraChat-style messages: a non-empty list of {role, content} with string values."""
    if not isinstance(obj, (list, tuple)) or not obj:
        raise Drop("bad_messages", "messages is not a non-empty list")
    out = []
    for msg in obj:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                or not isinstance(msg.get("content"), str):
            raise Drop("bad_messages", "a message is not {role: str, content: str}")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise Drop("no_assistant", "conversation has no assistant turn")
    return out


def labels_from_targets(ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Shifted labels: labels[t] = ids[t+1] where token t+1 is a target, else -100; last is -100."""
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    labels[:-1] = np.where(targets[1:], ids[1:], IGNORE)
    return labels


class ChatMasker:
    """Render conversations with a chat template and mark the assistant tokens as targets."""

    def __init__(self, tokenizer: Any, template: str, template_kwargs: dict[str, Any],
                 special_ids: set[int]) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        # The same compiled (sandboxed, trim_blocks, raise_exception, tojson) template that
        # tokenizer.apply_chat_template uses, so our text is byte-identical to it.
        self.template = _compile_jinja_template(template)
        self.kwargs = template_kwargs
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.special_ids = special_ids

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.kwargs)

    def _render_or_none(self, messages: list[dict[str, str]], gen: bool) -> str | None:
        try:
            return self.render(messages, gen)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses an empty conversation
            return None

    def _char_spans(self, messages: list[dict[str, str]],
                    full: str) -> tuple[list[tuple[int, int]], bool]:
        """(start, end) character span of each assistant turn's content in ``full``."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        fallback = False
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                # Only needed by the fallback: step over other turns so that a reply is never
                # searched for inside the question before it.
                text = msg["content"].strip()
                pos = full.find(text, cursor) if text else -1
                cursor = pos + len(text) if pos >= 0 else cursor
                continue
            start = None
            for gen in (True, False):
                prefix = self._render_or_none(messages[:k], gen)
                if prefix is not None and full.startswith(prefix) and len(prefix) >= cursor:
                    start = len(prefix)
                    break
            if start is None:
                fallback, start = True, cursor
                if not msg["content"].strip():
                    continue  # an empty reply cannot be located without the prefix: not trained
            # The reply as written (templates that keep whitespace train it too), else the
            # stripped reply (templates that trim, like Llama-3's).
            content = msg["content"]
            pos = full.find(content, start) if content.strip() else -1
            if pos < 0:
                content = content.strip()
                pos = full.find(content, start) if content else start
            if pos < 0:
                raise Drop("content_not_found", "the template changed an assistant message's text")
            spans.append((pos, pos + len(content)))
            cursor = pos + len(content)
        return spans, fallback

    def encode(self, messages: list[dict[str, str]]) -> ChatEncoding:
        try:
            full = self.render(messages)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception(), bad roles, ...
            raise Drop("template_error", f"{type(exc).__name__}: {exc}") from exc
        spans, fallback = self._char_spans(messages, full)
        # The template already wrote BOS etc.: no extra special tokens here.
        enc = self.tokenizer.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int32)
        starts = [s for s, _ in enc.offsets]
        ends = [e for _, e in enc.offsets]
        targets = np.zeros(len(ids), dtype=bool)
        turn_ends: list[int] = []
        for a, b in spans:
            if b > a:
                first = bisect_right(ends, a)      # first token ending after the content start
                last = bisect_left(starts, b) - 1  # last token starting before the content end
                targets[first:last + 1] = True
                nxt = last + 1
            else:                                   # empty reply: only the end-of-turn token
                nxt = bisect_left(starts, a)
                last = nxt - 1
            # The end-of-turn token directly follows the content; it must be a special token
            # (a template that closes turns with plain text gets no end-of-turn target).
            if nxt < len(ids) and int(ids[nxt]) in self.special_ids:
                targets[nxt] = True
                last = nxt
            if last >= 0 and targets[last]:
                turn_ends.append(last)
        return ChatEncoding(ids, targets, turn_ends, fallback)
