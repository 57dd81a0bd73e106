"""Chat conversations sampled from the teacher itself, for distillation on chat-shaped text.

    python -m services.data generate --teacher DIR --output chats.jsonl --conversations 20000 \\
        [--prompts FILE] [--max_new_tokens 256] [--max_user_tokens 128] [--batch_size 16] \\
        [--temperature 0.7] [--top_p 0.95] [--seed 0] [--device auto|cpu|cuda]

Why: a student distilled from an instruct teacher on plain documents never sees a chat turn,
so after ``<|im_start|>assistant\\n`` it ends the turn at once or loops (issue 18). Text the
teacher writes itself, in its own template, puts the distillation on exactly the distribution
the student must imitate in chat.

User turns come from ``--prompts`` (one per line, or JSON lines with "prompt"/"text"), else
Magpie-style self-instruct: the template is rendered up to the user turn's header and the
teacher writes the question. Each reply is sampled after the template's generation prompt.
Output: one ``{"messages": [user, assistant], "id": k}`` per line; ``id`` is the teacher row
(batch * batch_size + row) that made it, so a re-run with the same settings appends only what
is missing. The settings live in ``OUTPUT.meta.json``; a re-run with other ones is refused.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.repetition import loops

from .sources import DataError

# Stands in for the user's text while we render the template to find the user header and the
# end-of-turn token; plain letters, so no template's trim or escaping touches it.
SENTINEL = "QzxSentinelUserTextQzx"
# A self-instruct run that keeps nothing for this many batches in a row is going nowhere.
MAX_BARREN_BATCHES = 20
PROGRESS_SECONDS = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher model directory (with its "
                                                    "tokenizer and chat template)")
    p.add_argument("--output", required=True, type=Path, help="JSON lines file to write/extend")
    p.add_argument("--conversations", required=True, type=int, help="conversations wanted")
    p.add_argument("--prompts", type=Path, default=None,
                   help="user turns: text (one per line) or .jsonl with 'prompt'/'text'; "
                        "default: the teacher writes them (self-instruct)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="per reply, at most")
    p.add_argument("--max_user_tokens", type=int, default=128,
                   help="per self-instructed question, at most (a batch samples until its "
                        "longest row ends: one rambling question must not hold it up)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="start the output file afresh")


@dataclass
class Turns:
    """What the chat template implies for sampling."""

    user_prefix: str        # rendered text up to the user's content (the Magpie prompt)
    stop_ids: list[int]     # end-of-turn / eos tokens: sampling of a turn stops at any of them
    special_ids: set[int]   # a turn containing one of these (a new header...) is degenerate


def check_args(args: argparse.Namespace) -> None:
    """Everything checkable before the (slow) model load."""
    if args.conversations <= 0:
        raise DataError("--conversations must be a positive number of conversations")
    if min(args.max_new_tokens, args.max_user_tokens, args.batch_size) < 1:
        raise DataError("--max_new_tokens, --max_user_tokens and --batch_size must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise DataError("--temperature must be >= 0 and --top_p in (0, 1]")
    if not Path(args.teacher).is_dir():
        raise DataError(f"--teacher {args.teacher} is not a directory (pass the teacher's "
                        "model directory)")
    if args.prompts is not None and not args.prompts.is_file():
        raise DataError(f"--prompts {args.prompts} does not exist or is not a file")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DataError("--device cuda, but torch sees no CUDA device; use --device cpu")


def read_prompts(path: Path) -> list[str]:
    """Non-empty user turns from a text file (one per line) or JSON lines ('prompt'/'text')."""
    opener = gzip.open if path.name.endswith(".gz") else open
    is_json = path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz"))
    prompts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if not is_json:
                prompts.append(line.rstrip("\n").replace("\\n", "\n").strip())
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc})") from exc
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: needs a string 'prompt' or 'text' field")
            if text.strip():
                prompts.append(text.strip())
    if not prompts:
        raise DataError(f"--prompts {path} holds no prompt")
    return prompts


def load_tokenizer(teacher: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise DataError(f"--teacher {teacher}: cannot load its tokenizer "
                        f"({type(exc).__name__}: {exc})") from exc
    if not tokenizer.chat_template:
        raise DataError(f"--teacher {teacher}: the tokenizer has no chat template; put the "
                        "instruct model's template in chat_template.jinja (or 'chat_template' "
                        "in tokenizer_config.json) of that directory")
    return tokenizer


def template_turns(tokenizer: Any, generation_eos: Any) -> Turns:
    """Find the user header and the end-of-turn token by rendering a one-turn conversation."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}],
                                         tokenize=False)
    at = text.find(SENTINEL)
    if at < 0:
        raise DataError("the chat template does not write the user's message verbatim; "
                        "self-instruct cannot find the user header")
    decoder = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    special = {int(i) for i, tok in decoder.items() if tok.special}
    stops: list[int] = []
    # The token right after the user's text closes the turn (<|im_end|>, <|eot_id|>): the
    # teacher ends its replies with the same one.
    after = tokenizer(text[at + len(SENTINEL):], add_special_tokens=False)["input_ids"]
    if after and after[0] in special:
        stops.append(int(after[0]))
    extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    for tok in [tokenizer.eos_token_id, *extra]:
        if tok is not None and int(tok) not in stops:
            stops.append(int(tok))
    if not stops:
        raise DataError("neither the chat template nor the tokenizer names an end-of-turn or "
                        "eos token: turns could never end")
    return Turns(text[:at], stops, special)


def load_model(teacher: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    # bf16 is the teachers' native precision on GPUs; CPUs are slow and inexact in it.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype,
                                                     trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"--teacher {teacher}: cannot load the model "
                        f"({type(exc).__name__}: {exc})") from exc
    return model.to(device).eval()


def sample(model: Any, rows: list[list[int]], args: argparse.Namespace, turns: Turns,
           pad_id: int, max_new_tokens: int | None = None) -> list[tuple[list[int], bool]]:
    """One turn per row of at most ``max_new_tokens`` (default ``args.max_new_tokens``),
    sampled in a single left-padded batch: (token ids, ended)."""
    import torch
    from transformers import GenerationConfig

    width = max(len(r) for r in rows)
    # Left padding: every row's last prompt token sits in the last column, so all rows
    # continue in the same step; the mask keeps the padding out of attention and positions.
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    greedy = args.temperature == 0
    # generate() fills every None from the teacher's generation_config.json, then from
    # transformers' defaults (top_k=50): set the neutral values explicitly, so that only our
    # options shape the data.
    config = GenerationConfig(max_new_tokens=max_new_tokens or args.max_new_tokens,
                              min_length=0, num_beams=1,
                              do_sample=not greedy, temperature=1.0 if greedy else args.temperature,
                              top_p=1.0 if greedy else args.top_p, top_k=0, typical_p=1.0,
                              epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, eos_token_id=turns.stop_ids,
                              pad_token_id=pad_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)
    result = []
    for row in out[:, width:].tolist():
        for i, tok in enumerate(row):
            if tok in turns.stop_ids:
                result.append((row[:i], True))
                break
        else:
            result.append((row, False))
    return result


def verdict(ids: list[int], ended: bool, text: str, turns: Turns) -> str | None:
    """Why a sampled turn is unusable, or None when it is kept."""
    if not text.strip():
        return "empty"
    if not ended:
        # Cut at max_new_tokens: training its end-of-turn would teach stopping mid-sentence.
        return "unfinished"
    if any(tok in turns.special_ids for tok in ids):
        return "special_token"  # e.g. the teacher opened another turn inside this one
    if loops(ids):
        return "repetitive"
    return None


def norm(text: str) -> str:
    return " ".join(text.casefold().split())


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the output depends on; a resumed run must match it exactly."""
    return {"teacher": str(Path(args.teacher).resolve()),
            "prompts": str(args.prompts.resolve()) if args.prompts else None,
            "max_new_tokens": args.max_new_tokens, "max_user_tokens": args.max_user_tokens,
            "batch_size": args.batch_size,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def open_output(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    """Earlier records of a matching run (resume), or a fresh start; the meta file's path."""
    out: Path = args.output
    meta = out.with_name(out.name + ".meta.json")
    want = settings(args)
    if args.overwrite or not out.exists() or out.stat().st_size == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
        meta.write_text(json.dumps(want, indent=2) + "\n")
        return [], meta
    have = json.loads(meta.read_text()) if meta.is_file() else None
    if have != want:
        diff = ("no " + meta.name if have is None else ", ".join(
            f"{k} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v))
        raise DataError(f"--output {out} holds an earlier run with other settings ({diff}); "
                        "pass --overwrite, or another --output")
    data = out.read_bytes()
    good = data[:data.rfind(b"\n") + 1]  # a run killed mid-write leaves a partial last line
    if len(good) != len(data):
        out.write_bytes(good)
    records = []
    for n, line in enumerate(good.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise DataError(f"{out}:{n}: not JSON ({exc}); pass --overwrite") from exc
    return records, meta


class Sampler:
    """The teacher with everything a batch needs; keeps the drop counts and the questions seen."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any, model: Any,
                 records: list[dict[str, Any]]) -> None:
        self.args, self.tokenizer, self.model = args, tokenizer, model
        self.turns = template_turns(tokenizer, model.generation_config.eos_token_id)
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else self.turns.stop_ids[0])
        self.limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.prefix = tokenizer(self.turns.user_prefix, add_special_tokens=False)["input_ids"]
        self.dropped: Counter = Counter()
        self.done = {r.get("id") for r in records}
        self.seen = {norm(r["messages"][0]["content"]) for r in records}

    def _turns(self, rows: list[list[int]], role: str) -> list[str | None]:
        """Sample one turn per row; None (and a count) for an unusable one."""
        out: list[str | None] = []
        limit = self.args.max_user_tokens if role == "user" else self.args.max_new_tokens
        for tok, ended in sample(self.model, rows, self.args, self.turns, self.pad_id, limit):
            text = self.tokenizer.decode(tok)
            why = verdict(tok, ended, text, self.turns)
            self.dropped.update([f"{role}_{why}"] if why else [])
            out.append(None if why else text.strip())
        return out

    def users(self, ids: list[int]) -> list[str | None]:
        """Self-instruct: the teacher writes the questions after the user header."""
        out = self._turns([self.prefix] * len(ids), "user")
        for k, (i, text) in enumerate(zip(ids, out, strict=True)):
            if text is None or i in self.done:  # a resumed row was checked when it was kept
                continue
            if norm(text) in self.seen:  # small teachers ask "Hello!" over and over
                self.dropped["user_duplicate"] += 1
                out[k] = None
            else:
                self.seen.add(norm(text))
        return out

    def replies(self, ids: list[int], users: list[str | None]) -> list[tuple[int, list]]:
        """(id, messages) of the rows whose reply is usable."""
        rows, keep = [], []
        for i, user in zip(ids, users, strict=True):
            if user is None:
                continue
            chat = self.tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                      tokenize=False, add_generation_prompt=True)
            row = self.tokenizer(chat, add_special_tokens=False)["input_ids"]
            if len(row) + self.args.max_new_tokens > self.limit:
                self.dropped["user_too_long"] += 1
                continue
            rows.append(row)
            keep.append((i, user))
        answers = self._turns(rows, "assistant") if rows else []
        return [(i, [{"role": "user", "content": user},
                     {"role": "assistant", "content": answer}])
                for (i, user), answer in zip(keep, answers, strict=True) if answer is not None]


def generate(args: argparse.Namespace) -> str:
    """Run the command; returns the summary line."""
    check_args(args)
    prompts = read_prompts(args.prompts) if args.prompts else None
    tokenizer = load_tokenizer(args.teacher)  # before the model: a bad template fails fast
    records, _ = open_output(args)
    import torch

    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    teacher = Sampler(args, tokenizer, load_model(args.teacher, device), records)
    kept = resumed = len(records)
    rows = batches = barren = 0
    # Re-run the batch the last record came from: it may have been cut short by an earlier
    # --conversations; the same seed gives the same rows, and ids already written are skipped.
    batch = max((r["id"] for r in records if isinstance(r.get("id"), int)), default=0)
    batch //= args.batch_size
    started = last_report = time.time()
    exhausted = False
    with args.output.open("a", encoding="utf-8") as sink:
        while kept < args.conversations:
            first = batch * args.batch_size
            if prompts is not None and first >= len(prompts):
                exhausted = True
                break
            # Seeded per batch, not once: a resumed run samples exactly what one run would.
            torch.manual_seed(args.seed * 1_000_003 + batch)
            ids = list(range(first, first + args.batch_size))
            if prompts is not None:
                ids = ids[:len(prompts) - first]
            users = [prompts[i] for i in ids] if prompts is not None else teacher.users(ids)
            lines = []
            for i, messages in teacher.replies(ids, users):
                if i not in teacher.done and kept < args.conversations:
                    lines.append(json.dumps({"messages": messages, "id": i},
                                            ensure_ascii=False) + "\n")
                    kept += 1
            sink.write("".join(lines))
            sink.flush()  # whole batches only: an interrupted run resumes cleanly
            rows, batches, batch = rows + len(ids), batches + 1, batch + 1
            barren = 0 if lines else barren + 1
            if barren >= MAX_BARREN_BATCHES:
                raise DataError(f"the teacher wrote no usable conversation in {barren} batches "
                                f"in a row (dropped: {dict(teacher.dropped)}); try --prompts, "
                                "a larger --max_new_tokens or another --temperature")
            now = time.time()
            if now - last_report >= PROGRESS_SECONDS or kept >= args.conversations:
                rate = (kept - resumed) / max(now - started, 1e-9)
                eta = (args.conversations - kept) / rate if rate > 0 else float("inf")
                # the reasons too: a run cut short never prints its summary line
                why = ", ".join(f"{k} {v}" for k, v in teacher.dropped.most_common())
                print(f"generate: {kept}/{args.conversations} conversations, "
                      f"{sum(teacher.dropped.values())} dropped{f' ({why})' if why else ''}, "
                      f"{rate:.3f}/s, eta {eta:.0f} s", file=sys.stderr, flush=True)
                last_report = now
    seconds = time.time() - started
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(teacher.dropped.items()))
    line = (f"generate: {kept} conversations in {args.output} ({kept - resumed} new, "
            f"{resumed} from an earlier run), {sum(teacher.dropped.values())} dropped"
            f"{f' ({reasons})' if reasons else ''}, {rows} teacher rows in {batches} batches "
            f"on {device}, {seconds:.1f} s, {(kept - resumed) / max(seconds, 1e-9):.3f} "
            "conversations/s")
    if exhausted:
        line += f"; --prompts ran out ({len(prompts or [])} prompts)"
    return line
