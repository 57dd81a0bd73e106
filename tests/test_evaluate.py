"""services.evaluate on tiny real models: the maths against torch's own losses, every set format,
the CLI's reports and its refusals."""
from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.evaluate.__main__ import main, run
from services.evaluate.heldout import EvaluateError, load_set
from services.evaluate.models import Model, load_student, load_teacher
from services.evaluate.scores import score_sets
from shared.labels import IGNORE
from shared.student import convert_teacher, save_student
from shared.tiny import tiny_teacher

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
TEXT = ("Distillation trains a small student to imitate a large teacher. " * 3
        + "The quick brown fox jumps over the lazy dog. " * 4)


@pytest.fixture(scope="module")
def student_dir(tiny_llama, tmp_path_factory):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    student = convert_teacher(teacher, dict(layers=[1, 3], mixer="rwkv7"), tokenizer=tokenizer)
    return save_student(student, tokenizer, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def noisy_dir(tiny_llama, tmp_path_factory):
    """A student whose weights are all noised (so it disagrees with the teacher more often)."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    student = convert_teacher(teacher, dict(layers=[2], mixer="rwkv7"), tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return save_student(student, tokenizer, tmp_path_factory.mktemp("noisy"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "fox.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def teacher(tiny_llama):
    return load_teacher(tiny_llama, CPU, torch.float32), AutoTokenizer.from_pretrained(tiny_llama)


def _rows_ce(module: torch.nn.Module, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the scored positions, one unpadded row at a time."""
    logits, labels = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            kwargs = {"position_ids": torch.tensor([row["position_ids"]])} \
                if "position_ids" in row else {}
            out = module(input_ids=ids, use_cache=False, **kwargs).logits[0]
            target = torch.tensor(row["labels"])
            logits.append(out[target != IGNORE])
            labels.append(target[target != IGNORE])
    return torch.cat(logits), torch.cat(labels)


def test_teacher_against_itself_gives_kl_zero_and_full_agreement(tiny_llama, teacher,
                                                                 text_file) -> None:
    model, tokenizer = teacher
    held = load_set(str(text_file), tokenizer, tiny_llama, max_tokens=150, seq_len=40)
    second = Model("copy", str(tiny_llama), "student",
                   AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    rows = score_sets([model, second], [held], batch_size=3)
    assert [r["model"] for r in rows] == ["teacher", "copy"]
    for row in rows:  # the copy runs its own forward: the same function gives the same figures
        assert row["tokens"] == 150
        assert abs(row["kl"]) < 1e-6 and row["top1_agreement"] == 1.0
        assert row["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_perplexity_is_exp_of_the_mean_cross_entropy(tiny_llama, teacher, student_dir,
                                                     text_file) -> None:
    model, tokenizer = teacher
    # 40-token rows and a budget that ends mid-row: batches of 3 are padded
    held = load_set(str(text_file), tokenizer, tiny_llama, max_tokens=130, seq_len=40)
    assert [r["length"] for r in held.rows] == [40, 40, 40, 10]
    student = load_student(student_dir, CPU, torch.float32, "student")
    rows = score_sets([model, student], [held], batch_size=3)
    for row, module in zip(rows, (model.module, student.module), strict=True):
        logits, labels = _rows_ce(module, held.rows)
        assert row["tokens"] == labels.numel() == 130
        expected = math.exp(float(F.cross_entropy(logits, labels)))
        assert row["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_noised_student_has_kl_and_disagreements_as_torch_computes_them(
        tiny_llama, teacher, noisy_dir, text_file) -> None:
    model, tokenizer = teacher
    held = load_set(str(text_file), tokenizer, tiny_llama, max_tokens=120, seq_len=32)
    noisy = load_student(noisy_dir, CPU, torch.float32, "noisy")
    row = score_sets([model, noisy], [held], batch_size=2)[1]
    assert row["kl"] > 1e-4 and row["top1_agreement"] < 1.0
    t_logits, _ = _rows_ce(model.module, held.rows)
    s_logits, _ = _rows_ce(noisy.module, held.rows)
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                  reduction="batchmean")
    assert row["kl"] == pytest.approx(float(kl), rel=1e-4)
    agree = (t_logits.argmax(-1) == s_logits.argmax(-1)).float().mean()
    assert row["top1_agreement"] == pytest.approx(float(agree))


def test_jsonl_messages_and_parquet_text_load(tiny_llama, teacher, tmp_path) -> None:
    _, tokenizer = teacher
    chats = [[{"role": "user", "content": "Hello fox."}, {"role": "assistant", "content": "Hi."}],
             [{"role": "user", "content": "Name a dog."}]]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats)
                     + json.dumps({"text": "plain words"}) + "\n")
    eos = tokenizer.eos_token_id
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # a rendered chat ends with <|eot_id|>, the EOS: no second EOS is put after it
    assert ids(rendered[0])[-1] == eos
    want = ids(rendered[0]) + ids(rendered[1]) + ids("plain words")
    held = load_set(f"talk={jsonl}", tokenizer, tiny_llama, max_tokens=10_000, seq_len=16)
    assert (held.name, held.kind) == ("talk", "jsonl")
    stream = [t for r in held.rows for t in r["input_ids"]] + [held.rows[-1]["labels"][-1]]
    assert stream == want and held.tokens == len(want) - 1

    texts = ["The lazy dog sleeps.", "A fox jumps."]
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts, "id": [1, 2]}), parquet)
    held = load_set(str(parquet), tokenizer, tiny_llama, max_tokens=10_000, seq_len=8)
    assert (held.name, held.kind) == ("docs", "parquet")
    stream = [t for r in held.rows for t in r["input_ids"]] + [held.rows[-1]["labels"][-1]]
    assert stream == ids(texts[0]) + [eos] + ids(texts[1])
    assert all(r["labels"][:-1] == r["input_ids"][1:] for r in held.rows)
    # the budget caps the scored positions exactly
    assert load_set(str(parquet), tokenizer, tiny_llama, max_tokens=5, seq_len=8).tokens == 5

    long_text = tmp_path / "long.txt"  # only a prefix is read and tokenised: the same tokens
    long_text.write_text(TEXT * 400)
    held = load_set(str(long_text), tokenizer, tiny_llama, max_tokens=99, seq_len=50)
    stream = [t for r in held.rows for t in r["input_ids"]] + [held.rows[-1]["labels"][-1]]
    assert stream == ids(TEXT * 400)[:100]


def test_prepared_packed_validation_split_scores_each_document_alone(
        tiny_llama, teacher, student_dir, tmp_path) -> None:
    from services.data.__main__ import run as prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Doc {i} hi." + " Yes." * (i % 4) for i in range(60)]
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(["text", "--paths", str(corpus), "--tokenizer", str(tiny_llama), "--output_dir",
             str(tmp_path / "prepared"), "--max_len", "64", "--pack", "--validation_size", "3"])
    model, tokenizer = teacher
    held = load_set(str(tmp_path / "prepared"), tokenizer, tiny_llama, 10_000, 1024)
    assert (held.kind, held.split, len(held.rows)) == ("prepared", "validation", 3)
    assert any(0 in r["position_ids"][1:] for r in held.rows)  # rows hold several documents
    student = load_student(student_dir, CPU, torch.float32, "student")
    rows = score_sets([model, student], [held], batch_size=2)
    documents = []  # each packed document as a row of its own, positions from 0
    for r in held.rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [r["length"]]
        documents += [{"input_ids": r["input_ids"][a:b], "labels": r["labels"][a:b]}
                      for a, b in zip(starts, starts[1:], strict=False)]
    for row, module in zip(rows, (model.module, student.module), strict=True):
        logits, labels = _rows_ce(module, documents)
        assert row["tokens"] == labels.numel()
        expected = math.exp(float(F.cross_entropy(logits, labels)))
        assert row["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_cli_writes_one_row_per_model_and_set(tiny_llama, student_dir, noisy_dir, text_file,
                                              tmp_path, capsys) -> None:
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": TEXT}]}) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello fox\nName a dog\n")
    out_json, out_md = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.md"
    report = run(["--teacher", str(tiny_llama), "--student", str(student_dir),
                  "--student", f"noisy={noisy_dir}", "--data", str(text_file),
                  "--data", f"chat={jsonl}", "--max-tokens", "60", "--seq-len", "32",
                  "--batch-size", "2", "--device", "cpu", "--prompts", str(prompts),
                  "--max-new-tokens", "4", "--decode-contexts", "8,16", "--decode-tokens", "2",
                  "--json", str(out_json), "--markdown", str(out_md)])
    written = json.loads(out_json.read_text())
    assert written == json.loads(json.dumps(report))
    names = ["teacher", student_dir.name, "noisy"]
    assert [(r["set"], r["model"]) for r in written["scores"]] == [
        (s, m) for s in ("fox", "chat") for m in names]
    assert all(r["tokens"] == 60 for r in written["scores"])
    for r in written["scores"]:
        if r["model"] == "teacher":
            assert r["kl"] == 0.0 and r["top1_agreement"] == 1.0 and r["ppl_ratio"] == 1.0
    assert [list(g["outputs"]) for g in written["generations"]] == [names, names]
    assert [list(g["first_token"]) for g in written["generations"]] == [names, names]
    for g in written["generations"]:  # what the summary counts, answer by answer
        for name, facts in g["answers"].items():
            assert facts["empty"] == (not g["outputs"][name].strip()) and facts["tokens"] <= 4
    assert [r["model"] for r in written["answers"]] == names
    assert all(r["answers"] == 2 and r["loops"] == 0 for r in written["answers"])  # 4 tokens
    assert [r["empty"] for r in written["answers"]] == [
        sum(g["answers"][n]["empty"] for g in written["generations"]) for n in names]
    assert [(d["context"], d["model"]) for d in written["decode"]] == [
        (c, m) for c in (8, 16) for m in names]
    markdown = out_md.read_text()
    assert markdown in capsys.readouterr().out
    table = [line for line in markdown.splitlines() if line.startswith(("| fox |", "| chat |"))]
    assert len(table) == 6 + 2  # six score rows, plus the two sets in the table of sets
    assert "| model | answers | empty | loops | distinct 4-grams | tokens |" in markdown


def test_a_loop_is_a_turn_that_repeats_its_4_grams() -> None:
    from shared.repetition import distinct_ngrams, loops

    varied = list(range(40))
    looping = [5, 6, 7] * 10  # 27 4-grams, 3 distinct
    assert distinct_ngrams(varied) == 1.0 and not loops(varied)
    assert distinct_ngrams(looping) == pytest.approx(3 / 27) and loops(looping)
    assert not loops(looping[:20])  # too short to call
    assert distinct_ngrams([1, 2]) == 1.0  # no 4-gram at all


def test_refusals_are_one_line_errors(tiny_llama, student_dir, text_file, tmp_path,
                                      capsys) -> None:
    other = save_student(convert_teacher(tiny_teacher("llama", vocab=101), dict(layers=[0])), None,
                         tmp_path / "other-vocab")
    retokenised = tmp_path / "retokenised"
    shutil.copytree(student_dir, retokenised)
    config = json.loads((retokenised / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|end_of_text|>"
    (retokenised / "tokenizer_config.json").write_text(json.dumps(config))
    base = ["--teacher", str(tiny_llama), "--data", str(text_file)]
    capsys.readouterr()  # the exports' progress bars
    cases = [(["--student", str(other)], ["vocabulary mismatch", str(other), str(tiny_llama)]),
             (["--student", str(retokenised)], ["tokenizer mismatch", str(retokenised)]),
             (["--student", str(tiny_llama)], ["not an exported student", "'llama'"]),
             (["--data", str(tmp_path / "missing.jsonl")], ["no such file"]),
             (["--data", str(tmp_path)], ["card.json"])]
    for extra, needles in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
        assert all(n in err for n in needles), err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no text here"}) + "\n")
    with pytest.raises(EvaluateError, match="'text' string or a 'messages' list"):
        load_set(str(bad), AutoTokenizer.from_pretrained(tiny_llama), tiny_llama, 10, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_in_bf16_agrees_with_the_cpu(text_file, tmp_path) -> None:
    """On the device: --device auto runs bf16 (the student's fla kernels where installed: head
    size 64), scores within bf16's error of the float32 CPU run, measures peak decode memory."""
    from shared.tiny import make_tiny_llama

    teacher_dir = make_tiny_llama(tmp_path / "teacher", hidden_size=256, layers=2, heads=4)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student = convert_teacher(AutoModelForCausalLM.from_pretrained(teacher_dir),
                              dict(layers=[1], mixer="rwkv7"), tokenizer=tokenizer)
    student_dir = save_student(student, tokenizer, tmp_path / "student")
    args = ["--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(text_file),
            "--max-tokens", "200", "--seq-len", "64", "--decode-contexts", "64,256",
            "--decode-tokens", "8", "--prompts", str(text_file), "--max-new-tokens", "4"]
    cpu = run(args + ["--device", "cpu"])
    gpu = run(args + ["--json", str(tmp_path / "gpu.json")])
    assert (gpu["run"]["device"], gpu["run"]["dtype"]) == ("cuda", "bfloat16")
    for c, g in zip(cpu["scores"], gpu["scores"], strict=True):
        assert g["tokens"] == c["tokens"] == 200
        assert g["perplexity"] == pytest.approx(c["perplexity"], rel=0.03)
        assert g["kl"] == pytest.approx(c["kl"], abs=0.02)
    assert gpu["scores"][0]["kl"] == 0.0 and gpu["scores"][0]["top1_agreement"] == 1.0
    assert all(d["peak_memory_mib"] > 0 for d in gpu["decode"])


def test_first_token_is_the_chance_of_an_empty_reply(tiny_llama, teacher) -> None:
    """What the report shows beside each greedy output: P(the reply's first token ends the
    turn), and the top tokens, as a plain forward over the prompt computes them."""
    from services.evaluate.generation import end_ids, first_token, prompt_ids

    model, tokenizer = teacher
    ids = prompt_ids("Name a dog", tokenizer)
    got = first_token(model, ids, tokenizer, top=3)
    module = model.module
    with torch.no_grad():
        probs = module(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
    ends = end_ids(module, tokenizer)
    assert ends and got["p_end"] == pytest.approx(float(probs[ends].sum()), rel=1e-5)
    assert 0.0 < got["p_end"] < 1.0  # a random model: some chance of ending, not certainty
    values, indices = probs.topk(3)
    assert [t for t, _ in got["top"]] == [tokenizer.decode([i]) for i in indices.tolist()]
    assert [p for _, p in got["top"]] == pytest.approx(values.tolist(), rel=1e-5)
