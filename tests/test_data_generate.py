"""Chat data (issue 18): `generate` samples conversations from a tiny ChatML teacher, `wrap`
turns plain documents into conversations, `chat` tokenises either with labels on the assistant
tokens only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.data.__main__ import main
from services.data.generate import Turns, template_turns, verdict
from test_data_fixtures import prep, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2's template without its default system prompt.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = [f"Question {i}: where does river {i} flow?" for i in range(16)]


def make_teacher(root: Path, template: str | None) -> Path:
    """A random tiny Llama whose turns end now and then: every embedding carries a constant
    component that survives the (small) layers, and only <|im_end|> reads it, so each step
    samples <|im_end|> with a fixed, moderate probability; without it a random model over a
    300-token vocabulary would almost never end a turn."""
    from transformers import AutoTokenizer

    from shared.tiny import tiny_teacher, train_tokenizer

    train_tokenizer(root, vocab_size=300, max_bytes=200_000)
    tok = AutoTokenizer.from_pretrained(str(root))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template  # eos stays <|eot_id|>: the end of turn must come from it
    tok.save_pretrained(str(root))
    if template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            (root / name).unlink(missing_ok=True)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model = tiny_teacher("llama", layers=2, hidden=32, heads=2, kv_heads=1, vocab=len(tok),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[end, 0] = 0.6
    model.save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, single_thread) -> Path:
    return make_teacher(tmp_path_factory.mktemp("chatml-teacher"), CHATML)


@pytest.fixture(scope="module")
def chat_tokenizer(teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher))


def gen(teacher: Path, output: Path, n: int, *extra: object) -> list[dict]:
    argv = ["generate", "--teacher", teacher, "--output", output, "--conversations", n,
            "--max_new_tokens", 16, "--batch_size", 4, *extra]
    assert main([str(a) for a in argv]) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_template_gives_the_user_header_and_the_end_of_turn(chat_tokenizer):
    tokenizer = chat_tokenizer
    turns = template_turns(tokenizer, tokenizer.eos_token_id)
    assert turns.user_prefix == "<|im_start|>user\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turns.stop_ids == [im_end, tokenizer.eos_token_id]  # eos is <|eot_id|> here
    assert im_end in turns.special_ids


def test_degenerate_turns_are_named():
    turns = Turns("", [9], {9, 8})
    assert verdict([5, 6], True, "hi", turns) is None
    assert verdict([5], True, "  \n", turns) == "empty"
    assert verdict([5, 6], False, "hi", turns) == "unfinished"
    assert verdict([5, 8, 6], True, "hi", turns) == "special_token"
    assert verdict([1, 2, 3] * 10, True, "loop", turns) == "repetitive"
    assert verdict(list(range(10, 40)), True, "long", turns) is None


def check_records(records: list[dict], n: int) -> None:
    assert len(records) == n
    for rec in records:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert all(m["content"] == m["content"].strip() != "" for m in rec["messages"])
        assert not any(t in m["content"] for m in rec["messages"]
                       for t in ("<|im_start|>", "<|im_end|>"))
    ids = [r["id"] for r in records]
    assert ids == sorted(set(ids))


def test_prompts_file_gives_the_user_turns(teacher, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:8]) + "\n\n" + "\n".join(PROMPTS[8:]))
    records = gen(teacher, tmp_path / "a.jsonl", 6, "--prompts", tmp_path / "p.txt")
    check_records(records, 6)
    for rec in records:  # the id is the prompt's index
        assert rec["messages"][0]["content"] == PROMPTS[rec["id"]]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"generate: 6 conversations in {tmp_path / 'a.jsonl'} (6 new")
    assert " dropped (assistant_" in summary  # some replies are cut at 16 tokens
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]] + [{"text": "Hi?"}])
    records = gen(teacher, tmp_path / "b.jsonl", 50, "--prompts", tmp_path / "p.jsonl")
    assert 0 < len(records) <= 4  # the prompts ran out: fewer than asked, said so
    assert {r["messages"][0]["content"] for r in records} <= set(PROMPTS[:3]) | {"Hi?"}
    assert "--prompts ran out (4 prompts)" in capsys.readouterr().out


def test_left_padded_batches_answer_as_single_rows(chat_tokenizer):
    import argparse

    from services.data.generate import sample
    from shared.tiny import tiny_teacher

    tok = chat_tokenizer
    # A plain random model: the test teacher's greedy choice is <|im_end|> whatever it reads.
    model = tiny_teacher("llama", layers=2, hidden=32, heads=2, kv_heads=1, vocab=len(tok))
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in
            ("Hi?", PROMPTS[3], PROMPTS[12] * 3)]
    assert len({len(r) for r in rows}) == 3
    args = argparse.Namespace(max_new_tokens=12, temperature=0.0, top_p=1.0)
    turns = Turns("", [tok.pad_token_id], set())  # runs to max_new_tokens: compares them all
    together = sample(model, rows, args, turns, tok.pad_token_id)
    alone = [sample(model, [r], args, turns, tok.pad_token_id)[0] for r in rows]
    assert together == alone
    assert all(len(ids) == 12 and not ended for ids, ended in together)
    assert len({tuple(ids) for ids, _ in together}) == 3  # the rows did read their prompts
    # a turn's own limit (--max_user_tokens for the questions) overrides --max_new_tokens
    short = sample(model, rows, args, turns, tok.pad_token_id, 5)
    assert [ids for ids, _ in short] == [ids[:5] for ids, _ in together]


def test_self_instruct_is_seeded_and_resumes(teacher, tmp_path):
    first = gen(teacher, tmp_path / "a.jsonl", 8)
    check_records(first, 8)
    users = [r["messages"][0]["content"] for r in first]
    assert len(set(users)) == 8  # duplicates of an earlier question are dropped
    assert gen(teacher, tmp_path / "b.jsonl", 8) == first
    assert gen(teacher, tmp_path / "c.jsonl", 8, "--seed", 1) != first
    # Stopped after 3 (mid-batch), then asked for 8: the same file as one run of 8.
    assert gen(teacher, tmp_path / "d.jsonl", 3) == first[:3]
    assert gen(teacher, tmp_path / "d.jsonl", 8) == first
    assert gen(teacher, tmp_path / "d.jsonl", 8) == first  # done: nothing added
    with (tmp_path / "d.jsonl").open("a") as handle:
        handle.write('{"messages": [')  # a run killed mid-line
    assert gen(teacher, tmp_path / "d.jsonl", 8) == first


def test_chat_dataset_trains_exactly_the_assistant_tokens(teacher, chat_tokenizer, tmp_path):
    import datasets

    from shared.data_loader import TrainBatches
    from shared.fingerprint import tokenizer_fingerprint

    tokenizer = chat_tokenizer
    records = gen(teacher, tmp_path / "chats.jsonl", 8)
    card = prep("chat", "--paths", tmp_path / "chats.jsonl", "--tokenizer", teacher,
                "--output_dir", tmp_path / "data", "--max_len", 256)
    assert card["subcommand"] == "chat" and card["stats"]["samples_out"] == 8
    assert card["stats"]["dropped"] == {} and card["stats"]["prefix_fallbacks"] == 0
    rows = datasets.load_from_disk(str(tmp_path / "data"))["train"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, rec in zip(rows, records, strict=True):
        user, reply = rec["messages"]
        prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        body = tokenizer(reply["content"], add_special_tokens=False)["input_ids"] + [im_end]
        ids = row["input_ids"]
        assert ids == head + body + tokenizer("\n", add_special_tokens=False)["input_ids"]
        # labels[t] predicts ids[t+1]: trained exactly where ids[t+1] is a reply token or the
        # <|im_end|> closing it; the header, the user turn and the final newline are not.
        trained = set(range(len(head), len(head) + len(body)))
        assert row["labels"] == [ids[t + 1] if t + 1 in trained else -100
                                 for t in range(len(ids))]
    batches = TrainBatches(tmp_path / "data", micro_batch_size=4, seed=0,
                           expected_fingerprint=tokenizer_fingerprint(teacher))
    batch = next(iter(batches))
    assert len(batches) == 2 and batch["input_ids"].shape == batch["labels"].shape
    assert int((batch["labels"] != -100).sum()) > 0


def test_bad_input_is_one_clear_line(teacher, tmp_path, capsys):
    bare = make_teacher(tmp_path / "bare", None)
    (tmp_path / "junk.jsonl").write_text('{"text": "no messages"}\n')
    out = tmp_path / "o.jsonl"
    base = ["generate", "--teacher", str(teacher), "--output", str(out)]
    cases = [
        (["generate", "--teacher", str(bare), "--output", str(out), "--conversations", "2"],
         "the tokenizer has no chat template; put the instruct model's template in "
         "chat_template.jinja"),
        (base + ["--conversations", "2", "--prompts", str(tmp_path / "nope.txt")],
         f"--prompts {tmp_path / 'nope.txt'} does not exist"),
        (base + ["--conversations", "0"], "--conversations must be a positive number"),
        (base + ["--conversations", "-3"], "--conversations must be a positive number"),
        (base + ["--conversations", "2", "--top_p", "0"], "--top_p in (0, 1]"),
        (base + ["--conversations", "2", "--max_user_tokens", "0"],
         "--max_new_tokens, --max_user_tokens and --batch_size must be at least 1"),
        (["generate", "--teacher", str(tmp_path / "none"), "--output", str(out),
          "--conversations", "2"], "is not a directory"),
        (["chat", "--paths", str(tmp_path / "junk.jsonl"), "--tokenizer", str(teacher),
          "--output_dir", str(tmp_path / "d"), "--max_len", "64"],
         "junk.jsonl: records have no 'messages' field (found: text); chat reads a 'messages'"),
    ]
    for argv, message in cases:
        started = time.time()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert time.time() - started < 10
    assert not out.exists()  # nothing written on a usage error
    gen(teacher, out, 1)
    same = ["--max_new_tokens", "16", "--batch_size", "4"]
    assert main(base + same + ["--conversations", "2", "--temperature", "1.0"]) == 2
    assert "holds an earlier run with other settings (temperature 0.7 -> 1.0)" in \
        capsys.readouterr().err
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The real entry point; N <= 0 fails before transformers is even imported.
    proc = subprocess.run([sys.executable, "-m", "services.data", *cases[2][0]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {cases[2][1]} of conversations"]


def test_a_document_becomes_conversations_that_hold_all_of_it():
    from services.data.wrap import as_conversations, document_title

    paragraphs = [" ".join(f"w{i}_{j}" for j in range(120)) for i in range(9)]  # ~700 chars each
    text = "Kernel modules\n==============\n\n" + "\n\n".join(paragraphs)
    assert document_title(text) == "Kernel modules"
    turns = list(as_conversations(text, max_chars=1600))
    assert len(turns) > 3
    asks = [t["messages"][0]["content"] for t in turns]
    replies = [t["messages"][1]["content"] for t in turns]
    assert asks[0] == 'Write the text titled "Kernel modules".'
    assert asks[1] == 'Continue the text titled "Kernel modules" (part 2).'
    assert all(len(r) <= 1600 for r in replies)
    assert " ".join(" ".join(replies).split()) == " ".join(text.split())  # nothing lost
    long_word = list(as_conversations("x" * 3500, max_chars=1600))  # cut hard where no space is
    assert [len(t["messages"][1]["content"]) for t in long_word] == [1600, 1600, 300]


def test_wrapped_documents_train_as_assistant_turns(teacher, chat_tokenizer, tmp_path, capsys):
    """services.data wrap -> chat: each document is the assistant's reply (labels on it and its
    end of turn), the user's turn asks for it by title; bad input is one clear line."""
    import datasets

    docs = [f"Title {i}\n\n" + " ".join(f"word{i}x{j}" for j in range(12)) for i in range(5)]
    write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in docs])
    out = tmp_path / "wrapped.jsonl"
    argv = ["wrap", "--paths", str(tmp_path / "docs.jsonl"), "--output", str(out),
            "--text_column", "body", "--ask", "Show me {title}."]
    assert main(argv) == 0
    assert "5 documents as 5 conversations" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in records] == [f"Show me Title {i}." for i in
                                                              range(5)]
    assert [r["messages"][1]["content"] for r in records] == docs
    prep("chat", "--paths", out, "--tokenizer", teacher, "--output_dir", tmp_path / "data",
         "--max_len", 256)
    rows = datasets.load_from_disk(str(tmp_path / "data"))["train"]
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, doc in zip(rows, docs, strict=True):
        trained = [t for t in row["labels"] if t != -100]
        assert trained == chat_tokenizer(doc, add_special_tokens=False)["input_ids"] + [im_end]
    cases = [(["--text_column", "text"], "docs.jsonl: records have no 'text' field (found: body)"),
             (["--text_column", "body", "--ask", "{name}"], "only {title} and {part} may be"),
             (["--text_column", "body", "--max_chars", "10"], "--max_chars 10: at least 100")]
    for extra, message in cases:
        assert main(["wrap", "--paths", str(tmp_path / "docs.jsonl"),
                     "--output", str(tmp_path / "bad.jsonl"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    (tmp_path / "broken.jsonl").write_text('{"body": "fine"}\n[1, 2]\n')
    assert main(["wrap", "--paths", str(tmp_path / "broken.jsonl"), "--output",
                 str(tmp_path / "bad.jsonl"), "--text_column", "body"]) == 2
    assert "broken.jsonl:2: not a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists() and not list(tmp_path.glob("*.partial"))
