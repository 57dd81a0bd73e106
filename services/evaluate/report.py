"""The evaluation report as Markdown (the JSON report is the same dict, written as it is)."""
from __future__ import annotations

from typing import Any

from shared.repetition import LOOP_MIN_DISTINCT, LOOP_MIN_TOKENS, LOOP_N


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no column breaks)."""
    return " ".join(text.replace("|", "\\|").split()) or "(empty)"


def scores_table(scores: list[dict[str, Any]]) -> list[str]:
    lines = ["| set | model | tokens | perplexity | ppl / teacher | KL(t‖s) / token "
             "| top-1 agree |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in scores:
        lines.append(f"| {row['set']} | {row['model']} | {row['tokens']} | "
                     f"{_num(row['perplexity'], 3)} | {_num(row['ppl_ratio'], 3)} | "
                     f"{_num(row['kl'])} | {_num(row['top1_agreement'])} |")
    return lines


def decode_lines(rows: list[dict[str, Any]], device: str) -> list[str]:
    lines = ["| model | context | prefill tok/s | decode tok/s | decode / teacher | "
             "weights (MiB) | peak extra memory (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peak = row["peak_memory_mib"]
        lines.append(f"| {row['model']} | {row['context']} | {row['prefill_tokens_per_s']:.1f} | "
                     f"{row['decode_tokens_per_s']:.1f} | {row['decode_speedup']:.2f} | "
                     f"{row['weights_mib']:.1f} | "
                     f"{'-' if peak is None else f'{peak:.1f}'} |")
    if device == "cpu":
        lines += ["", "Peak memory is not measured on the CPU (the process's peak RSS cannot be "
                  "reset between models)."]
    return lines


def answer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The answers summed up per model: empty ones, loops, distinct 4-grams, length."""
    if not rows:
        return []
    lines = [f"An answer loops when it has {LOOP_MIN_TOKENS} tokens or more and fewer than "
             f"{LOOP_MIN_DISTINCT:.0%} of its {LOOP_N}-grams are distinct (shared/repetition.py); "
             "distinct 4-grams and tokens are means over the prompts.", "",
             "| model | answers | empty | loops | distinct 4-grams | tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['answers']} | {r['empty']} | {r['loops']} | "
              f"{r['distinct_4grams']:.3f} | {r['tokens']:.1f} |" for r in rows]
    return lines + [""]


def generation_lines(generations: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for number, item in enumerate(generations, 1):
        lines += [f"**Prompt {number}:** {_cell(item['prompt'])}", "",
                  "| model | P(ends at once) | first token: top 3 | greedy output |",
                  "|---|---:|---|---|"]
        for name, text in item["outputs"].items():
            first = item.get("first_token", {}).get(name)
            p_end, top = ("–", "–") if first is None else (
                f"{first['p_end']:.3f}",
                ", ".join(f"`{_cell(repr(tok))}` {p:.2f}" for tok, p in first["top"]))
            lines.append(f"| {name} | {p_end} | {top} | {_cell(text)} |")
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The whole report: what was compared, the scores table, then optional sections."""
    run = report["run"]
    lines = ["# Evaluation", "",
             f"Teacher `{report['models'][0]['path']}`; device {run['device']}, {run['dtype']}; "
             f"batch size {run['batch_size']}, plain-text rows of {run['seq_len']} tokens, at "
             f"most {run['max_tokens']} scored tokens per set.", ""]
    lines += ["| model | role | path | parameters |", "|---|---|---|---:|"]
    lines += [f"| {m['name']} | {m['role']} | `{m['path']}` | {m['parameters']:,} |"
              for m in report["models"]]
    lines += ["", "| set | kind | split | rows | path |", "|---|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['kind']} | {s['split'] or '-'} | {s['rows']} | `{s['path']}` |"
              for s in report["sets"]]
    lines += ["", "## Scores", "",
              "Perplexity is exp of the total NLL over the scored tokens; KL(teacher‖student) and "
              "top-1 agreement (argmax student == argmax teacher) are means over the same tokens; "
              "ppl / teacher is the model's perplexity over the teacher's on the same set.", ""]
    lines += scores_table(report["scores"])
    if report.get("decode"):
        lines += ["", "## Decode speed", "",
                  f"One row of random token ids per context, {report['decode'][0]['new_tokens']} "
                  "greedy steps through the model's cache; peak extra memory is the most allocated "
                  "above the loaded weights during prefill + decode (cache and activations).", ""]
        lines += decode_lines(report["decode"], run["device"])
    if report.get("generations"):
        lines += ["", "## Greedy generations", ""]
        lines += answer_lines(report.get("answers", []))
        lines += generation_lines(report["generations"])
    return "\n".join(lines).rstrip() + "\n"
