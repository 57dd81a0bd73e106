"""The quality experiment's script (benchmarks/quality.py) end to end on CPU, tiny: the arms run
through the product's commands, a continuing arm starts from the right export with its own
recipe, the evaluation scores every student, and a second run reuses the finished stages (the
experiment spans device calls, where an error costs GPU time we do not get back)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import quality
from tests.conftest import wait_for

STAGE_ARGS = "--data.micro_batch_size 1 --data.max_len 64"


def corpus(root: Path) -> Path:
    """Real English text (Debian's licence texts, on every Debian system) as quality_corpus's
    three files."""
    texts = [p.read_text(errors="ignore")[:4000]
             for p in sorted(Path("/usr/share/common-licenses").iterdir()) if p.is_file()][:8]
    assert len(texts) >= 6, "needs /usr/share/common-licenses (Debian base-files)"
    root.mkdir(parents=True)
    for name, part in (("train", texts[:4]), ("heldout_docs", texts[4:6]),
                       ("heldout_handbook", texts[6:] or texts[4:6])):
        with (root / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    return root


def test_arms_run_continue_evaluate_and_resume(tiny_llama, tmp_path, capsys):
    args = ["--teacher", str(tiny_llama), "--corpus", str(corpus(tmp_path / "corpus")),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--arms", "rwkv7,flat,long,wrap,mixwrap", "--rwkv7-steps", "2,2", "--chat-steps", "1",
            "--eval-tokens", "200",
            "--long-context", "128", "--trainer-args", STAGE_ARGS]
    assert quality.main(args) == 0
    stages = {s["stage"]: s for s in
              json.loads((tmp_path / "out/quality_stages.json").read_text())}
    assert list(stages) == ["rwkv7-align", "rwkv7-kd", "flat-kd", "long-kd", "wrap-kd",
                            "mixwrap-kd"]
    assert all(s["tokens"] > 0 and Path(s["student"], "config.json").is_file()
               for s in stages.values())
    flat = json.loads((tmp_path / "work/flat-kd/quality_stage.json").read_text())["command"]
    assert flat[flat.index("--student.init_from") + 1] == stages["rwkv7-align"]["student"]
    assert flat[flat.index("--train.lr_init") + 1] == "1e-5"
    assert flat[flat.index("--train.steps") + 1] == "2"  # as many steps as rwkv7's kd
    long = json.loads((tmp_path / "work/long-kd/quality_stage.json").read_text())["command"]
    assert long[long.index("--student.init_from") + 1] == stages["rwkv7-kd"]["student"]
    assert long[long.index("--data.train_dir") + 1] == str(tmp_path / "work/data/train128")
    last = {flag: long[len(long) - 1 - long[::-1].index(flag) + 1]  # the last one wins
            for flag in ("--data.max_len", "--data.micro_batch_size")}
    assert last == {"--data.max_len": "128", "--data.micro_batch_size": str(32 * 1024 // 128)}
    wrap = json.loads((tmp_path / "work/wrap-kd/quality_stage.json").read_text())["command"]
    assert wrap[wrap.index("--student.init_from") + 1] == stages["rwkv7-kd"]["student"]
    assert wrap[wrap.index("--data.train_dir") + 1] == str(tmp_path / "work/data/wrap")
    assert wrap[wrap.index("--train.steps") + 1] == "1"  # --chat-steps
    mixed = json.loads((tmp_path / "work/mixwrap-kd/quality_stage.json").read_text())["command"]
    assert mixed[mixed.index("--student.init_from") + 1] == stages["rwkv7-align"]["student"]
    assert mixed[mixed.index("--data.train_dir") + 1] == str(tmp_path / "work/data/train")
    assert mixed[mixed.index("--data.mix_dirs") + 1] == str(tmp_path / "work/data/wrap")
    assert mixed[mixed.index("--train.steps") + 1] == "2"  # as many steps as rwkv7's kd
    assert "data: 2 datasets mixed, shares 0.50, 0.50" in \
        (tmp_path / "work/mixwrap-kd.log").read_text()
    card = json.loads((tmp_path / "work/data/wrap/card.json").read_text())
    assert (card["subcommand"], card["chat_format"]) == ("chat", "chat")
    scored = json.loads((tmp_path / "out/quality_eval.json").read_text())
    assert {"teacher", "rwkv7", "flat", "long", "wrap", "mixwrap"} <= \
        {r["model"] for r in scored["scores"]}
    capsys.readouterr()

    assert quality.main(args) == 0  # every stage done: reused, not trained again
    out = capsys.readouterr().out
    assert all(f"{name}: reused" in out for name in stages)


def test_the_hybrids_continuing_arms_start_from_its_align_export(tiny_llama, tmp_path, capsys):
    args = ["--teacher", str(tiny_llama), "--corpus", str(corpus(tmp_path / "corpus")),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--arms", "hybrid,hflat,hlayers,hhigh", "--hybrid-steps", "1,2",
            "--eval-tokens", "200", "--arm-args", "hhigh=--train.warmup_steps 1",
            "--arm-args", "hybrid.kd=--train.lr_final 2e-5",  # its kd stage only
            "--kd-variant", "h1e3@hybrid=--train.lr_init 1e-3",
            "--trainer-args", STAGE_ARGS + " --student.layers 1,3"]  # of the tiny teacher's 4
    assert quality.main(args) == 0
    stages = {s["stage"]: s for s in
              json.loads((tmp_path / "out/quality_stages.json").read_text())}
    for arm, flag, value in (("hflat", "--train.lr_init", "1e-5"),
                             ("hlayers", "--train.trainable", "rwkv_layers"),
                             ("hhigh", "--train.lr_init", "6e-4"),
                             ("hhigh", "--train.warmup_steps", "1"),  # its own --arm-args
                             ("h1e3", "--train.lr_init", "1e-3")):  # a --kd-variant
        cmd = json.loads((tmp_path / f"work/{arm}-kd/quality_stage.json").read_text())["command"]
        assert cmd[cmd.index("--config") + 1] == "configs/smollm2_hybrid_kd.yaml"
        assert cmd[cmd.index("--student.init_from") + 1] == stages["hybrid-align"]["student"]
        assert cmd[cmd.index(flag) + 1] == value
        assert cmd[cmd.index("--train.steps") + 1] == "2"  # as many steps as hybrid's kd
    def trained(stage: str) -> int:   # the trainer's "training N parameters (...)" line
        log = (tmp_path / f"work/{stage}.log").read_text()
        return int(re.search(r"training (\d+) parameters \(", log).group(1))

    assert trained("hlayers-kd") < trained("hybrid-kd")   # the converted layers only
    others = json.loads((tmp_path / "work/hybrid-kd/quality_stage.json").read_text())["command"]
    assert "--train.warmup_steps" not in others  # one arm's --arm-args are its own
    assert others[others.index("--train.lr_final") + 1] == "2e-5"  # hybrid.kd's
    for stage in ("hybrid-align", "hhigh-kd", "h1e3-kd"):  # not the align's, not inherited
        cmd = json.loads((tmp_path / f"work/{stage}/quality_stage.json").read_text())["command"]
        assert "--train.lr_final" not in cmd, stage
    assert "h1e3" in {r["model"] for r in
                      json.loads((tmp_path / "out/quality_eval.json").read_text())["scores"]}
    for bad in (["--arm-args", "hybrid.sft=--train.lr_final 2e-5"],   # no such stage
                ["--kd-variant", "h2@control=--train.lr_init 1e-3"],  # no kd stage to repeat
                ["--kd-variant", "hhigh@hybrid=--train.lr_init 1e-3"]):  # a name taken
        with pytest.raises(SystemExit):
            quality.main([*args, *bad])
    with pytest.raises(SystemExit):  # an arm that does not run: refused, not ignored
        quality.main([*args[:-2], "--arm-args", "control=--data.max_len 32"])
    # a finished stage asked again with other arguments: refused, where the trainer would have
    # resumed its last checkpoint and trained nothing (2026-12-03 on the H200)
    capsys.readouterr()
    again = [a.replace("--train.warmup_steps 1", "--train.warmup_steps 2") for a in args]
    assert quality.main(again) == 1
    out = capsys.readouterr().out
    assert "hhigh: FAILED: hhigh-kd finished before" in out and "remove" in out, out[-1500:]
    assert "hybrid-kd: reused" in out


def test_rwkv7wrap_mixes_the_conversations_into_its_own_kd_stage(tiny_llama, tmp_path):
    """rwkv7wrap is one lineage of its own: rwkv7's align recipe, then kd from that export on
    the documents mixed 1:1 with their wrapped conversations, with no rwkv7 stage beside it."""
    args = ["--teacher", str(tiny_llama), "--corpus", str(corpus(tmp_path / "corpus")),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--arms", "rwkv7wrap", "--rwkv7-steps", "1,2", "--eval-tokens", "200",
            "--kd-variant", "w3@rwkv7wrap=--train.lr_init 3e-4", "--trainer-args", STAGE_ARGS]
    assert quality.main(args) == 0
    stages = [s["stage"] for s in json.loads((tmp_path / "out/quality_stages.json").read_text())]
    assert stages == ["rwkv7wrap-align", "rwkv7wrap-kd", "w3-kd"]
    variant = json.loads((tmp_path / "work/w3-kd/quality_stage.json").read_text())["command"]
    assert variant[variant.index("--student.init_from") + 1] == \
        str(tmp_path / "work/rwkv7wrap-align/student")
    for flag, value in (("--data.mix_dirs", str(tmp_path / "work/data/wrap")),  # its parent's
                        ("--data.mix_weights", "1,1"), ("--train.lr_init", "3e-4")):
        assert variant[variant.index(flag) + 1] == value
    cmd = json.loads((tmp_path / "work/rwkv7wrap-kd/quality_stage.json").read_text())["command"]
    assert cmd[cmd.index("--config") + 1] == "configs/smollm2_rwkv7_kd.yaml"
    start = cmd[cmd.index("--student.init_from") + 1]
    assert start == str(tmp_path / "work/rwkv7wrap-align/student")
    assert cmd[cmd.index("--data.train_dir") + 1] == str(tmp_path / "work/data/train")
    assert cmd[cmd.index("--data.mix_dirs") + 1] == str(tmp_path / "work/data/wrap")
    assert cmd[cmd.index("--train.steps") + 1] == "2"
    assert "data: 2 datasets mixed, shares 0.50, 0.50" in \
        (tmp_path / "work/rwkv7wrap-kd.log").read_text()
    assert not (tmp_path / "work/rwkv7-kd").exists()


def test_the_control_stage_gets_the_time_of_two():
    """The control trains in one stage what the distilled arms train in two: a per-stage time
    limit doubles for it, and nothing else changes."""
    extra = ["--data.max_len", "64", "--train.time_limit_seconds", "185"]
    assert quality.stage_time_limit(extra, 2) == ["--data.max_len", "64",
                                                  "--train.time_limit_seconds", "370.0"]
    assert quality.stage_time_limit(["--data.max_len", "64"], 2) == ["--data.max_len", "64"]
    assert extra[-1] == "185"


def test_a_sigterm_waits_for_the_stage_to_checkpoint(tiny_llama, tmp_path):
    """A device call's time limit sends SIGTERM to the experiment's process group: the script
    exits only after the running stage has checkpointed (so the call does not end on a half
    written checkpoint) and says the same command resumes; the rerun resumes that stage."""
    args = ["--teacher", str(tiny_llama), "--corpus", str(corpus(tmp_path / "corpus")),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--arms", "rwkv7", "--rwkv7-steps", "1,100000", "--eval-tokens", "200",
            "--trainer-args", STAGE_ARGS]
    def stopped_run(ready, what: str) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.quality", *args],
                                cwd=quality.ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for(ready, 240, what)
            os.killpg(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode != 0, out
        assert "stopped by SIGTERM" in out and "the same command resumes" in out, out[-2000:]
        return out

    steps, log = tmp_path / "work/rwkv7-kd/steps-rank0.jsonl", tmp_path / "work/rwkv7-kd.log"
    stopped_run(lambda: steps.is_file() and len(steps.read_text().splitlines()) >= 2,
                "the kd stage's second step")
    assert "stop requested: checkpointed at step" in log.read_text()  # before the script ended
    assert (tmp_path / "work/rwkv7-kd/checkpoints").is_dir()

    out = stopped_run(lambda: log.is_file() and "resumed from" in log.read_text(),
                      "the rerun's kd stage to resume")
    assert "rwkv7-align: reused" in out


def test_broad_corpus_adds_training_text_only(tmp_path, monkeypatch):
    """--broad puts more documentation sets in train.jsonl (HTML as its text), their own
    held-out files apart, and leaves both held-out sets of earlier runs exactly as they were."""
    from benchmarks import quality_corpus as qc

    licences = [p for p in sorted(Path("/usr/share/common-licenses").iterdir()) if p.is_file()]
    kernel, python, handbook, pods, pages = (tmp_path / d for d in
                                             ("kernel", "python", "hb", "pods", "pages"))
    for d in (kernel, python, handbook, pods, pages):
        d.mkdir()
    for i, lic in enumerate(licences[:4]):
        (python / f"{i}.rst.txt").write_text(lic.read_text(errors="ignore")[:3000])
        (pods / f"{i}.pod").write_text("=head1 POD\n\n" + lic.read_text(errors="ignore")[:3000])
    (handbook / "a.html").write_text("<p>" + "handbook prose " * 40 + "</p>")
    (pages / "b.html").write_text("<html><head><style>x{}</style></head><body><p>"
                                  + "sql page text " * 40 + "</p></body></html>")
    monkeypatch.setattr(qc, "KERNEL_DOCS", kernel)
    monkeypatch.setattr(qc, "PYTHON_DOCS", python)
    monkeypatch.setattr(qc, "HANDBOOK", handbook)
    monkeypatch.setattr(qc, "PACKAGES", {kernel: "k", python: "p", handbook: "h"})
    monkeypatch.setattr(qc, "BROAD", [(pods, "*.pod", "perl-doc"), (pages, "*.html", "sql")])
    # the real split hashes the path, and tmp_path changes from run to run: file 0 of each set
    monkeypatch.setattr(qc, "held_out", lambda path: path.name.startswith("0."))
    assert qc.main(["--output", str(tmp_path / "narrow")]) == 0
    assert qc.main(["--output", str(tmp_path / "broad"), "--broad"]) == 0

    def sources(d: str, name: str) -> list[str]:
        path = tmp_path / d / f"{name}.jsonl"
        return [json.loads(line)["source"] for line in path.read_text().splitlines()]

    for name in ("heldout_docs", "heldout_handbook"):
        assert (tmp_path / "narrow" / f"{name}.jsonl").read_bytes() == \
            (tmp_path / "broad" / f"{name}.jsonl").read_bytes()
    added = set(sources("broad", "train")) - set(sources("narrow", "train"))
    broad_out = sources("broad", "heldout_broad")
    assert added and broad_out and not added & set(broad_out)
    assert {str(p) for p in pods.iterdir()} | {str(pages / "b.html")} == added | set(broad_out)
    page = [json.loads(x) for x in (tmp_path / "broad/train.jsonl").read_text().splitlines()
            if json.loads(x)["source"].endswith("b.html")]
    assert page and "sql page text" in page[0]["text"] and "<p>" not in page[0]["text"]
    assert "x{}" not in page[0]["text"]
    monkeypatch.setattr(qc, "BROAD", [(tmp_path / "absent", "*.pod", "perl-doc")])
    assert qc.main(["--output", str(tmp_path / "x"), "--broad"]) == 2  # names the package
