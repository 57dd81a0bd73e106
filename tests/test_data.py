"""Data preparation (issue 5) on small files in the hub layouts: the three sub-commands."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.data.render import ChatMasker
from services.data.sources import DataError
from test_data_fixtures import (
    DOCS,
    EOT,
    NON_INCREMENTAL_TEMPLATE,
    QWEN_LIKE_TEMPLATE,
    assert_shifted,
    conversation,
    invalid_utf8_string_array,
    prep,
    trained_text,
    write_c4,
    write_jsonl,
    write_ultrachat,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- ultrachat / chat


def test_ultrachat_trains_exactly_the_assistant_turns(tok_dir, tokenizer, tmp_path):
    convs = [conversation(i, turns=1 + i % 3) for i in range(12)]
    write_ultrachat(tmp_path / "uc", "train_sft", convs, shards=2)
    write_ultrachat(tmp_path / "uc", "test_sft", [conversation(100)])
    write_ultrachat(tmp_path / "uc", "train_gen", [conversation(200)])  # not picked by default
    card = prep("ultrachat", "--input", tmp_path / "uc", "--tokenizer", tok_dir,
                "--output_dir", tmp_path / "out", "--max_len", 512, "--chunk_size", 5)
    assert card["stats"]["samples_in"] == 13 and card["stats"]["truncated"] == 0
    data = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(data["train"]) == 12 and len(data["validation"]) == 1
    expected = convs[0::2] + convs[1::2]  # shard 0, then shard 1
    for row, conv in zip(data["train"], expected, strict=True):
        rendered = tokenizer.apply_chat_template(conv, tokenize=False)
        assert row["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert trained_text(tokenizer, row) == "".join(
            m["content"].strip() + EOT for m in conv if m["role"] == "assistant")
        assert_shifted(row)
        assert row["labels"][-1] == -100


def test_ultrachat_plain_format(tok_dir, tokenizer, tmp_path):
    convs = [conversation(i, turns=2) for i in range(3)]
    write_ultrachat(tmp_path / "uc", "train_sft", convs)
    prep("ultrachat", "--input", tmp_path / "uc", "--tokenizer", tok_dir, "--splits", "train_sft",
         "--output_dir", tmp_path / "out", "--max_len", 512, "--format", "plain")
    row = datasets.load_from_disk(str(tmp_path / "out"))["train"][0]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("<|begin_of_text|>User : Question 0.0")
    assert "\n\nAssistant : The river" in text
    # The content tokens carry the space after "Assistant :" (byte-level BPE), nothing else.
    assert trained_text(tokenizer, row) == "".join(
        " " + m["content"].strip() + EOT for m in convs[0] if m["role"] == "assistant")


@pytest.mark.parametrize("template, fallback, trims", [(QWEN_LIKE_TEMPLATE, False, False),
                                                       (NON_INCREMENTAL_TEMPLATE, True, True)])
def test_masker_on_other_templates(tokenizer, template, fallback, trims):
    masker = ChatMasker(tokenizer.backend_tokenizer, template, dict(tokenizer.special_tokens_map),
                        {0, 1, 2, 3, 4, 5})
    conv = conversation(7, turns=2) + [{"role": "user", "content": "bye"},
                                       {"role": "assistant", "content": ""}]
    # Replies keep their trailing spaces (a template that does not trim trains them); leading
    # spaces are dropped because byte-level BPE would merge them with the header's newline
    # into one token, which is then trained as a whole.
    conv = [{"role": m["role"], "content": m["content"].lstrip()} for m in conv]
    enc = masker.encode(conv)
    assert enc.prefix_fallback is fallback
    trained = tokenizer.decode(enc.ids[enc.targets].tolist())
    # System prompt, headers, the template's newline after end-of-turn: none of them trained;
    # the empty last reply trains just its end-of-turn token.
    expected = "".join((m["content"].strip() if trims else m["content"]) + EOT
                       for m in conv if m["role"] == "assistant")
    if fallback:  # without the prefix property an empty reply cannot be located: not trained
        expected = expected[:-len(EOT)]
    assert trained == expected
    assert len(enc.turn_ends) == 3 - fallback


def test_ultrachat_truncates_at_a_turn_boundary(tok_dir, tokenizer, tmp_path):
    conv = conversation(1, turns=3, long_reply=3)
    two_turns = len(tokenizer(tokenizer.apply_chat_template(conv[:4], tokenize=False),
                              add_special_tokens=False)["input_ids"])
    huge_first_reply = conversation(2, turns=2, long_reply=60)
    huge_prompt = [{"role": "user", "content": "word " * 400},
                   {"role": "assistant", "content": "ok"}]
    write_ultrachat(tmp_path / "uc", "train_sft", [conv, huge_first_reply, huge_prompt])
    card = prep("ultrachat", "--input", tmp_path / "uc", "--tokenizer", tok_dir, "--splits",
                "train_sft", "--output_dir", tmp_path / "out", "--max_len", two_turns + 5)
    rows = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert card["stats"]["truncated"] == 2 and card["stats"]["dropped"] == {"too_long": 1}
    assert len(rows[0]["input_ids"]) == two_turns  # cut after the second assistant turn
    assert trained_text(tokenizer, rows[0]) == "".join(
        m["content"].strip() + EOT for m in conv[:4] if m["role"] == "assistant")
    assert rows[1]["length"] == two_turns + 5 and trained_text(tokenizer, rows[1])  # cut mid-turn
    assert rows[0]["labels"][-1] == -100


# --------------------------------------------------------------------------- plain text


def test_text_packing_keeps_document_boundaries_and_trains_eos(packed_dir, tokenizer):
    eos = tokenizer.eos_token_id
    card = json.loads((packed_dir / "card.json").read_text())
    rows = [r for b in card["splits"]["train"]["buckets"] if b["path"]
            for r in datasets.load_from_disk(str(packed_dir / b["path"]))]
    docs_seen = 0
    for row in rows:
        assert_shifted(row)
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        ends = [p for p, t in enumerate(ids) if t == eos]
        starts = [p for p, q in enumerate(pos) if q == 0]
        assert starts == [0] + [e + 1 for e in ends[:-1]] and ends[-1] == len(ids) - 1
        for end in ends:
            assert labels[end - 1] == eos  # EOS is a target ...
            assert labels[end] == -100     # ... but nothing across the document boundary
        docs_seen += len(ends)
    assert docs_seen + card["splits"]["validation"]["samples"] <= len(DOCS)
    assert card["stats"]["documents_out"] == len(DOCS)


def test_pack_fill_fills_every_row_and_keeps_the_token_stream(tok_dir, tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": t} for t in DOCS])
    rows = {}
    for mode, flags in (("whole", ["--pack"]), ("fill", ["--pack", "--pack_fill"])):
        card = prep("text", "--paths", tmp_path / "c" / "a.jsonl", "--tokenizer", tok_dir,
                    "--output_dir", tmp_path / mode, "--max_len", 32, "--long_docs", "split",
                    *flags)
        assert card["pack_fill"] == (mode == "fill")
        rows[mode] = list(datasets.load_from_disk(str(tmp_path / mode))["train"])
    whole, fill = rows["whole"], rows["fill"]
    assert all(r["length"] == 32 for r in fill[:-1]) and 0 < fill[-1]["length"] <= 32
    assert sum(r["length"] < 32 for r in whole) > 1  # whole documents leave rows short
    for key in ("input_ids", "labels"):  # the same tokens and targets, in the same order
        assert sum((r[key] for r in fill), []) == sum((r[key] for r in whole), [])
    assert len(fill) < len(whole)
    # the stream is shifted across the cuts too: a piece's last label is the token that
    # starts the next piece, in the same row or (cut at a row's end) the next one, where it
    # starts at position 0 (a new segment)
    ids, labels = sum((r["input_ids"] for r in fill), []), sum((r["labels"] for r in fill), [])
    assert all(labels[t] in (-100, ids[t + 1]) for t in range(len(ids) - 1))
    cut = [i for i, r in enumerate(fill[:-1]) if r["labels"][-1] != -100]
    assert cut and all(fill[i + 1]["position_ids"][0] == 0 for i in cut)
    with pytest.raises(DataError, match="--pack_fill fills packed rows: add --pack"):
        prep("text", "--paths", tmp_path / "c" / "a.jsonl", "--tokenizer", tok_dir,
             "--output_dir", tmp_path / "bad", "--max_len", 32, "--pack_fill")


def test_text_unpacked_labels_and_long_docs(tok_dir, tokenizer, tmp_path):
    long_doc = "alpha beta gamma delta " * 30
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": "short text"}, {"text": long_doc}])
    full = tokenizer(long_doc, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    for mode in ("truncate", "split"):
        card = prep("text", "--paths", tmp_path / "c" / "a.jsonl", "--tokenizer", tok_dir,
                    "--output_dir", tmp_path / mode, "--max_len", 40, "--long_docs", mode)
        rows = list(datasets.load_from_disk(str(tmp_path / mode))["train"])
        assert rows[0]["labels"] == rows[0]["input_ids"][1:] + [-100]
        assert rows[0]["input_ids"][-1] == tokenizer.eos_token_id
        assert card["stats"]["truncated"] == 1
        pieces = rows[1:]
        assert pieces[0]["input_ids"] == full[:40] and pieces[0]["labels"][-1] == full[40]
        if mode == "split":
            joined = sum((p["input_ids"] for p in pieces), [])
            assert joined == full[:len(joined)]
            assert len(joined) >= len(full) - 1
        else:
            assert len(pieces) == 1


def test_special_token_text_is_not_a_special_token(tok_dir, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"fake end {EOT} here"}])
    prep("text", "--paths", tmp_path / "a.jsonl", "--tokenizer", tok_dir, "--output_dir",
         tmp_path / "o", "--max_len", 64)
    ids = datasets.load_from_disk(str(tmp_path / "o"))["train"][0]["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def test_buckets_hold_their_lengths_and_every_sample(tok_dir, tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": t} for t in DOCS])
    common = ["text", "--paths", tmp_path / "c", "--tokenizer", tok_dir, "--max_len", 64]
    prep(*common, "--output_dir", tmp_path / "flat")
    card = prep(*common, "--output_dir", tmp_path / "bucketed", "--buckets", 16)
    flat = Counter(tuple(r["input_ids"])
                   for r in datasets.load_from_disk(str(tmp_path / "flat"))["train"])
    layout = card["splits"]["train"]["buckets"]
    assert [(b["min_len"], b["max_len"]) for b in layout] == [(1, 16), (17, 32), (33, 48), (49, 64)]
    bucketed: Counter = Counter()
    for b in layout:
        if b["path"]:
            part = datasets.load_from_disk(str(tmp_path / "bucketed" / b["path"]))
            assert len(part) == b["samples"] > 0
            assert all(b["min_len"] <= n <= b["max_len"] for n in part["length"])
            bucketed.update(tuple(ids) for ids in part["input_ids"])
    assert bucketed == flat


# --------------------------------------------------------------------------- c4


def test_c4_interleaving_alternates_languages(tok_dir, tokenizer, tmp_path):
    en = [f"English page {i}." for i in range(6)]
    zh = [f"中文网页 {i}。" for i in range(4)]
    write_c4(tmp_path / "c4", "en", "train", en)
    write_c4(tmp_path / "c4", "zh", "train", zh)
    write_c4(tmp_path / "c4", "en", "validation", ["English validation page."], shards=1)
    write_c4(tmp_path / "c4", "zh", "validation", ["中文验证。"], shards=1)
    common = ["c4", "--local_c4_dir", tmp_path / "c4", "--languages", "en", "zh",
              "--tokenizer", tok_dir, "--max_len", 64]
    card = prep(*common, "--output_dir", tmp_path / "rr")
    texts = [tokenizer.decode(r["input_ids"][:-1])
             for r in datasets.load_from_disk(str(tmp_path / "rr"))["train"]]
    en_order, zh_order = en[0::2] + en[1::2], zh[0::2] + zh[1::2]  # file 0 then file 1
    assert texts == [en_order[0], zh_order[0], en_order[1], zh_order[1], en_order[2], zh_order[2],
                     en_order[3], zh_order[3], en_order[4], en_order[5]]
    assert card["stats"]["samples_in_by_source"] == {"en": 6, "zh": 4}
    # Weighted sampling is seeded: same seed, same order; every document used once.
    orders = []
    for seed, name in ((1, "p1"), (1, "p2")):
        prep(*common, "--output_dir", tmp_path / name, "--probabilities", 0.8, 0.2, "--seed", seed)
        rows = datasets.load_from_disk(str(tmp_path / name))["train"]["input_ids"]
        orders.append([tuple(r) for r in rows])
    assert orders[0] == orders[1] and len(orders[0]) == 10
    prep(*common, "--output_dir", tmp_path / "val", "--split", "validation")
    val = datasets.load_from_disk(str(tmp_path / "val"))
    assert list(val) == ["validation"] and len(val["validation"]) == 2


# --------------------------------------------------------------------------- bad input


def test_bad_records_are_counted_drops_with_any_num_proc(tok_dir, tmp_path):
    good = [{"text": f"good document {i}"} for i in range(5)]
    write_jsonl(tmp_path / "c" / "a.jsonl",
                good[:3] + [{"text": ""}, {"text": "   \n"}, {"text": None}, {"other": "x"}],
                raw_lines=[b'{"text": "lone \\ud800 surrogate"}\n',
                           b'{"text": "caf\xe9 latin-1"}\n', b"not json at all\n"])
    table = pa.table({"text": invalid_utf8_string_array([b"fine text", b"bad \xff\xfe bytes"])})
    pq.write_table(table, tmp_path / "c" / "b.parquet")
    write_jsonl(tmp_path / "c" / "c.jsonl.gz", good[3:])
    outputs = []
    for num_proc in (1, 2):
        out = tmp_path / f"o{num_proc}"
        card = prep("text", "--paths", tmp_path / "c", "--tokenizer", tok_dir, "--output_dir", out,
                    "--max_len", 32, "--num_proc", num_proc, "--chunk_size", 2)
        assert card["stats"]["dropped"] == {"bad_json": 1, "bad_utf8": 3, "empty": 2,
                                            "missing_field": 2}
        assert card["stats"]["samples_in"] == 14 and card["stats"]["samples_out"] == 6
        outputs.append(datasets.load_from_disk(str(out))["train"]["input_ids"])
    assert outputs[0] == outputs[1]  # the output does not depend on --num_proc


@pytest.mark.parametrize("num_proc", [1, 2])
def test_clear_errors_name_the_problem(tok_dir, tmp_path, num_proc):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "nocol.parquet")
    write_jsonl(tmp_path / "nocol.jsonl", [{"body": "x"}])
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    write_ultrachat(tmp_path / "uc", "train_sft", [conversation(0)])
    pq.write_table(pa.table({"prompt": ["x"]}),
                   tmp_path / "uc" / "data" / "test_sft-00000-of-00001-x.parquet")
    common = ["--output_dir", tmp_path / "o", "--max_len", 32, "--num_proc", num_proc,
              "--overwrite"]
    cases = [
        (["text", "--paths", tmp_path / "nocol.parquet", "--tokenizer", tok_dir],
         "nocol.parquet: no 'text' column"),
        (["text", "--paths", tmp_path / "nocol.jsonl", "--tokenizer", tok_dir],
         "nocol.jsonl: records have no 'text'"),
        (["text", "--paths", tmp_path / "broken.jsonl.gz", "--tokenizer", tok_dir],
         "broken.jsonl.gz: cannot read"),
        (["text", "--paths", tmp_path / "nocol.jsonl", "--tokenizer", tmp_path / "missing"],
         "missing does not exist"),
        (["ultrachat", "--input", tmp_path / "uc", "--tokenizer", tok_dir],
         "test_sft-00000-of-00001-x.parquet: no 'messages'"),
        (["c4", "--local_c4_dir", tmp_path, "--languages", "de", "--tokenizer", tok_dir],
         "no C4 files for language 'de'"),
    ]
    for argv, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            prep(*argv, *common)


def test_output_dir_is_never_clobbered(tok_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x y"}])
    for extra in ([], ["--overwrite"]):
        with pytest.raises(DataError, match="not empty"):
            prep("text", "--paths", tmp_path / "a.jsonl", "--tokenizer", tok_dir,
                 "--output_dir", tmp_path / "mine", "--max_len", 8, *extra)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_cli_subprocess(tok_dir, tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": t} for t in DOCS[:20]] + [{"text": ""}])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "services.data", "text", "--paths", str(tmp_path / "c"),
            "--output_dir", str(tmp_path / "o"), "--max_len", "64"]
    ok = subprocess.run(base + ["--tokenizer", str(tok_dir), "--num_proc", "2",
                                "--validation_fraction", "0.25"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("text: 21 samples in, 20 samples out (")
    assert "1 dropped (empty 1)" in last
    bad = subprocess.run(base + ["--tokenizer", str(tmp_path / "nope"), "--overwrite"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"error: --tokenizer {tmp_path / 'nope'} does not exist" in bad.stderr


def test_validation_options(tok_dir, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    common = ["text", "--paths", tmp_path / "a.jsonl", "--tokenizer", tok_dir, "--max_len", 64]
    card = prep(*common, "--output_dir", tmp_path / "s", "--validation_size", 7)
    assert card["splits"]["validation"]["samples"] == 7 and card["splits"]["train"]["samples"] == 33
    a = prep(*common, "--output_dir", tmp_path / "f1", "--validation_fraction", 0.3, "--seed", 3)
    b = prep(*common, "--output_dir", tmp_path / "f2", "--validation_fraction", 0.3, "--seed", 3)
    assert a["splits"] == b["splits"] and 0 < a["splits"]["validation"]["samples"] < 40
    with pytest.raises(DataError, match="not both"):
        prep(*common, "--output_dir", tmp_path / "x", "--validation_size", 2,
             "--validation_fraction", 0.1)


def test_tasks_are_bounded_in_bytes_as_well_as_records(tmp_path):
    from services.data.sources import file_chunks

    write_jsonl(tmp_path / "a.jsonl", [{"text": "x" * 1000} for _ in range(10)])
    pq.write_table(pa.table({"text": ["y" * 1000] * 10}), tmp_path / "b.parquet")
    for name, expected in (("a.jsonl", [3, 3, 3, 1]), ("b.parquet", [2, 2, 2, 2, 2])):
        chunks = list(file_chunks(tmp_path / name, "text", "train", size=100, max_bytes=2500))
        assert [len(c) for c in chunks] == expected


@pytest.mark.parametrize("num_proc", [1, 2])
def test_unexpected_worker_failure_is_a_clear_error(tok_dir, tokenizer, num_proc):
    from services.data.process import WorkerConfig, process_chunks
    from services.data.sources import RawChunk

    config = WorkerConfig(mode="text", tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                          max_len=16, eos_id=tokenizer.eos_token_id)
    good = RawChunk("json", [b'{"text": "fine"}'], "text", "train", "good.jsonl")
    broken = RawChunk("json", [12345], "text", "train", "broken.jsonl")  # not bytes: a bug upstream
    with pytest.raises(DataError, match=r"broken\.jsonl: TypeError"):
        list(process_chunks([good, broken], config, num_proc))
