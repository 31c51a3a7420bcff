"""Evaluation: accuracy per problem set, tokens per response, overconfidence, ECE, a comparison
table of runs and a self-contained HTML report.

    python eval.py --ckpt ckpt/comt ckpt/cot --sets data/world/test_id.jsonl data/world/ood_hard.jsonl
    python eval.py --compare out/eval/*/metrics.json          # table.md + report.html of earlier runs
    python eval.py --ckpt base --given-plan --sets data/world/test_id.jsonl   # execution alone: the prompt
                                                              # carries the gold plan (world problems only)

Definitions (the paper names the metrics but not their exact form; these are our choices):
- accuracy: a response is correct when its final "The answer is N." line matches the gold answer
  (data.extract_answer / data.answers_match). Greedy decoding by default. With --n-samples n > 1
  (sampling) accuracy is the mean over all samples (= unbiased pass@1) and pass@k is reported too.
- ID avg / OOD avg: unweighted mean of the per-set accuracies (each benchmark counts once).
- tokens: generated tokens per response, including the final stop token; averaged per set, and the
  run's figure is the mean of the per-set means.
- train time: the last `wall_time_s` of the checkpoint's metrics.jsonl; for an RL checkpoint plus
  that of the SFT checkpoint it started from (see train_stages).
- overconfidence rate at tau (primary): among all computed numbers with confidence > tau, the share
  that are wrong: #(wrong and conf > tau) / #(conf > tau). Also reported: the share of wrong computed
  numbers that are confident, #(wrong and conf > tau) / #(wrong). Pooled over all sets of a run.
- computed numbers, their correctness and confidence come from confidence.py (first occurrence of a
  value not in the question; correct when among the gold intermediates or answer; confidence
  exp(-mean entropy) over its tokens, entropy of the policy's softmax at temperature 1 when greedy).
- ECE: 10 equal-width confidence bins, sum over bins of (bin size / total) * |accuracy - mean conf|,
  over the computed numbers of all sets.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import data

# model, tokenizer and confidence (torch) are imported where they are used: --compare and the
# report need only the standard library and start at once.


@dataclass
class EvalConfig:
    ckpt: list = field(default_factory=list)  # checkpoint directories to evaluate (one run each)
    names: list = field(default_factory=list)  # run names, one per ckpt (default: the directory name)
    sets: list = field(default_factory=list)  # problems .jsonl files; set name = file stem
    id_sets: list = field(default_factory=list)  # set names counted in-distribution besides test_id*
    out: str = "out/eval"  # writes <out>/<run>/{metrics.json,samples.jsonl}, <out>/table.md, report
    report: str = ""  # HTML report path (default <out>/report.html)
    compare: list = field(default_factory=list)  # metrics.json files, run dirs or run names to tabulate
    batch_size: int = 32  # sequences per generate() call
    max_new_tokens: int = 256  # generation budget per response
    greedy: bool = True  # greedy decoding (the paper's evaluation); --no-greedy samples
    n_samples: int = 1  # responses per problem; > 1 needs --no-greedy and adds pass@k
    temperature: float = 1.0  # sampling temperature when not greedy
    limit: int = 0  # evaluate only the first N problems of each set (0 = all)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # torch seed for sampling
    compile: bool = False  # CUDA: decode with the compiled step (a CUDA graph per batch shape); same tokens
    confidence_kind: str = "exp"  # confidence of a number: exp(-mean H) | norm (1 - mean H / log V)
    thresholds: tuple = (0.5, 0.7, 0.9)  # overconfidence thresholds tau
    n_bins: int = 10  # equal-width bins for ECE and the reliability diagrams
    arithmetic: int = 0  # > 0: also probe bare arithmetic ("a op b =") with this many items per cell
    given_plan: bool = False  # prompt = question + the gold meta-thought ("Plan: ... Execution:"): execution alone
    group_seeds: bool = False  # table rows = runs named NAME_sK grouped, mean ± std over the seeds


class EvalError(ValueError):
    """Bad input: the message is one line naming the thing, where, and what was expected."""


# -- Pure metric functions ------------------------------------------------------------------------

def _ratio(num, den):
    return num / den if den else None


def accuracy(correct):
    """Fraction of True in `correct`; None for an empty list."""
    correct = list(correct)
    return _ratio(sum(bool(c) for c in correct), len(correct))


def overconfidence_rate(records, tau):
    """records: computed numbers, each {"correct": bool, "confidence": float}.

    wrong_among_confident (the overconfidence rate we report): #(wrong, conf > tau) / #(conf > tau),
    i.e. the error rate among confident numbers. confident_among_wrong: #(wrong, conf > tau) / #(wrong),
    the share of errors made confidently. Either is None when its denominator is 0."""
    n_conf = n_wrong = n_both = 0
    for r in records:
        confident, wrong = r["confidence"] > tau, not r["correct"]
        n_conf += confident
        n_wrong += wrong
        n_both += confident and wrong
    return {"wrong_among_confident": _ratio(n_both, n_conf),
            "confident_among_wrong": _ratio(n_both, n_wrong),
            "n_numbers": len(records), "n_confident": n_conf, "n_wrong": n_wrong,
            "n_wrong_confident": n_both}


def reliability_bins(confidences, correct, n_bins=10):
    """Equal-width bins over [0, 1]: bin i holds i/n <= c < (i+1)/n, the last one also c = 1.
    Per bin: lo, hi, count, mean_confidence and accuracy (None when empty)."""
    confidences, correct = list(confidences), list(correct)
    if len(confidences) != len(correct):
        raise EvalError(f"reliability_bins: {len(confidences)} confidences but {len(correct)} labels")
    sums = [[0, 0.0, 0] for _ in range(n_bins)]  # count, sum of confidence, number correct
    for c, y in zip(confidences, correct):
        if not 0.0 <= c <= 1.0:  # also rejects NaN
            raise EvalError(f"confidence {c!r} is outside [0, 1]")
        s = sums[min(int(c * n_bins), n_bins - 1)]
        s[0] += 1
        s[1] += c
        s[2] += bool(y)
    return [{"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": n,
             "mean_confidence": _ratio(sc, n), "accuracy": _ratio(k, n)}
            for i, (n, sc, k) in enumerate(sums)]


def expected_calibration_error(confidences, correct, n_bins=10):
    """ECE (Naeini et al. 2015; Guo et al. 2017): sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return None
    return sum(b["count"] / total * abs(b["accuracy"] - b["mean_confidence"])
               for b in bins if b["count"])


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise EvalError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def correctness_variance(n_c):
    """How the variance of a sample's correctness splits, from (n samples, c correct) per problem (n >= 2):
    total = p(1 - p) over all samples (p their accuracy); within = the mean over problems of p_i (1 - p_i),
    estimated without bias by c (n - c) / (n (n - 1)); share = within / total, the part of a reward's spread
    that tells two answers to the same problem apart (the rest says which problems are easy); mixed = the
    fraction of problems with both right and wrong samples. None where undefined."""
    n_c = [(n, c) for n, c in n_c if n >= 2]
    if not n_c:
        return None
    p = sum(c for _, c in n_c) / sum(n for n, _ in n_c)
    within = _mean(c * (n - c) / (n * (n - 1)) for n, c in n_c)
    total = p * (1 - p)
    return {"total": total, "within": within, "share": _ratio(within, total),
            "mixed": _mean(0 < c < n for n, c in n_c)}


def summarize_set(records, thresholds=(0.5, 0.7, 0.9), n_bins=10):
    """Metrics of one problem set from its per-problem records (see evaluate())."""
    responses = [r for p in records for r in p["responses"]]
    numbers = [x for r in responses for x in r["computed_numbers"]]
    out = {"n_problems": len(records), "n_responses": len(responses),
           "accuracy": accuracy(r["correct"] for r in responses),
           "mean_tokens": _ratio(sum(r["n_tokens"] for r in responses), len(responses)),
           "parsable_rate": accuracy(r["pred"] is not None for r in responses),
           "eos_rate": accuracy(r["eos"] for r in responses),
           "n_computed_numbers": len(numbers)}
    n = min((len(p["responses"]) for p in records), default=1)
    if n > 1:  # sampled: pass@k averaged over problems, k = 1, 2, 4, ... and n
        n_c = [(len(p["responses"]), sum(r["correct"] for r in p["responses"])) for p in records]
        out["pass_at_k"] = {str(k): _mean(pass_at_k(m, c, k) for m, c in n_c)
                            for k in sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})}
        out["correctness_variance"] = correctness_variance(n_c)
    out.update(number_metrics(numbers, thresholds, n_bins))
    return out


def number_metrics(numbers, thresholds=(0.5, 0.7, 0.9), n_bins=10):
    conf, corr = [x["confidence"] for x in numbers], [x["correct"] for x in numbers]
    return {"overconfidence": {f"{t:g}": overconfidence_rate(numbers, t) for t in thresholds},
            "ece": expected_calibration_error(conf, corr, n_bins),
            "reliability": reliability_bins(conf, corr, n_bins)}


def _sum_or_none(values):
    values = list(values)
    return None if None in values or not values else sum(values)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize_run(set_records, id_sets, thresholds=(0.5, 0.7, 0.9), n_bins=10):
    """set_records: {set name: per-problem records}. Per-set metrics plus the run's aggregates."""
    sets = {name: summarize_set(recs, thresholds, n_bins) for name, recs in set_records.items()}
    ids = [s for s in sets if s in id_sets]
    oods = [s for s in sets if s not in id_sets]
    numbers = [x for recs in set_records.values() for p in recs for r in p["responses"]
               for x in r["computed_numbers"]]
    out = {"sets": sets, "id_sets": ids, "ood_sets": oods,
           "id_avg": _mean(sets[s]["accuracy"] for s in ids),
           "ood_avg": _mean(sets[s]["accuracy"] for s in oods),
           "mean_tokens": _mean(m["mean_tokens"] for m in sets.values()),
           "n_computed_numbers": len(numbers)}
    out.update(number_metrics(numbers, thresholds, n_bins))
    return out


# -- The evaluation loop --------------------------------------------------------------------------

def computed_numbers(tokenizer, problem, response_ids, entropies, kind="exp"):
    """The computed numbers of one response, [{"value", "text", "correct", "confidence"}], scored
    by confidence.py against the gold answer and intermediates. entropies[i] belongs to
    response_ids[i]."""
    import confidence
    texts = [tokenizer.token_bytes(i) for i in response_ids]
    golds = [problem["answer"], *(problem.get("intermediates") or [])]
    found = confidence.score_computed_numbers(texts, entropies, problem["question"], golds, kind=kind,
                                              vocab_size=tokenizer.vocab_size)
    return [{"value": x.value, "text": x.text, "correct": bool(x.correct), "confidence": x.confidence}
            for x in found]


def evaluate(model, tokenizer, problems, batch_size, max_new_tokens, greedy=True, n_samples=1,
             temperature=1.0, confidence_kind="exp", progress=True, given_plan=False, compile=False):
    """Generate n_samples responses per problem and score them. Returns the set's metrics
    (summarize_set: accuracy, mean_tokens, ...) with "records", one per problem:
    {id, question, gold, responses: [{text, pred, correct, n_tokens, eos, computed_numbers}]}.
    given_plan: the prompt also holds the problem's gold meta-thought (the CoMT teacher's, from its
    "program"), so the response is the execution alone: can the model run a plan it did not write?"""
    from model import generate
    from tqdm import tqdm
    if greedy and n_samples > 1:
        raise EvalError("n_samples > 1 needs sampling (greedy=False / --no-greedy)")
    prompts = [tokenizer.render(data.prompt_text(p) + (data.programmatic_teacher(p) if given_plan else ""))[0]
               for p in problems]
    jobs = [i for i in range(len(problems)) for _ in range(n_samples)]
    records = [{"id": p.get("id"), "question": p["question"], "gold": p["answer"], "responses": []}
               for p in problems]
    stop_ids = set(tokenizer.stop_ids)
    for start in tqdm(range(0, len(jobs), batch_size), desc="eval", leave=False,
                      disable=not progress):
        batch = jobs[start:start + batch_size]
        # model.generate reads temperature 0 as greedy. Its entropies are those of the distribution
        # each token came from: the policy's softmax at temperature 1 when greedy, else at T.
        gen = generate(model, [prompts[i] for i in batch], max_new_tokens,
                       temperature=0.0 if greedy else temperature,
                       stop_ids=stop_ids, pad_id=tokenizer.pad_id, compile=compile)
        tokens, mask = gen.tokens.tolist(), gen.mask.tolist()
        ents, finished = gen.entropies.float().tolist(), gen.finished.tolist()
        for row, i in enumerate(batch):
            ids = [t for t, m in zip(tokens[row], mask[row]) if m]
            ent = [e for e, m in zip(ents[row], mask[row]) if m]
            eos = bool(finished[row])
            body = ids[:-1] if eos and ids and ids[-1] in stop_ids else ids
            text = tokenizer.decode(body)
            pred = data.extract_answer(text)
            records[i]["responses"].append({
                "text": text, "pred": pred,
                "correct": data.grade_answer(text, problems[i]["answer"]) is True,
                "n_tokens": len(ids), "eos": eos,
                "computed_numbers": computed_numbers(tokenizer, problems[i], body, ent[:len(body)],
                                                     confidence_kind)})
    return {**summarize_set(records), "records": records}


# -- Comparison table -----------------------------------------------------------------------------

def _pct(x):
    return "–" if x is None else x if isinstance(x, str) else f"{100 * x:.1f}"


def _duration(s):
    if s is None or isinstance(s, str):
        return s or "–"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


# -- Base skills: bare arithmetic -----------------------------------------------------------------

ARITH_SIZES = {"1-2 digits": (1, 99), "3 digits": (100, 999), "4-6 digits": (1000, 999999)}


def arithmetic_items(n, seed=0):
    """n items per (operation, operand size) cell: the drill lines of the base corpus, "a op b = c".
    Subtraction keeps c >= 0 and division is exact, as in the corpus."""
    import random
    rng, items = random.Random(seed), []
    for op in "+-*/":
        for size, (lo, hi) in ARITH_SIZES.items():
            for _ in range(n):
                a, b = rng.randint(lo, hi), rng.randint(lo, hi) if op in "+-" else rng.randint(2, 99)
                if op == "-" and b > a:
                    a, b = b, a
                if op == "/":
                    a = a * b if a * b <= hi * 99 else a - a % b or b
                c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
                items.append((op, size, f"{a} {op} {b} =", c))
    return items


def arithmetic_accuracy(model, tokenizer, n=50, seed=0, batch_size=64):
    """Greedy "a op b =" -> accuracy per operation and operand size (second operand of * and /
    is 2-99): {op: {size: acc}}. The prompt is a drill line at the start of a document."""
    from model import generate
    items = arithmetic_items(n, seed)
    hits = {}
    for k in range(0, len(items), batch_size):
        chunk = items[k:k + batch_size]
        prompts = [tokenizer.encode(q, bos=tokenizer.bos_id is not None) for _, _, q, _ in chunk]
        g = generate(model, prompts, 12, temperature=0.0, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
        for (op, size, _, c), row, m in zip(chunk, g.tokens, g.mask):
            text = tokenizer.decode([t for t in row[m.bool()].tolist() if t not in tokenizer.stop_ids])
            got = data.parse_number(text.split("\n")[0].strip())
            hits.setdefault(op, {}).setdefault(size, []).append(got is not None and got == c)
    return {op: {size: accuracy(v) for size, v in sizes.items()} for op, sizes in hits.items()}


def arithmetic_table(runs):
    header = ["run", "op"] + list(ARITH_SIZES)
    rows = [[r["run"], op] + [_pct(accs.get(size)) for size in ARITH_SIZES]
            for r in runs for op, accs in (r.get("arithmetic") or {}).items()]
    return header, rows


def group_by_seed(runs):
    """Runs named NAME_sK -> one run per NAME whose numbers are 'mean ± std' strings over seeds."""
    import re
    import statistics
    groups = {}
    for r in runs:
        groups.setdefault(re.sub(r"_s\d+$", "", r["run"]), []).append(r)

    def agg(vals, fmt):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{fmt(statistics.mean(vals))} ± {fmt(sd)}"

    pct = lambda v: f"{100 * v:.1f}"
    out = []
    for name, rs in groups.items():
        g = {"run": f"{name} (n={len(rs)})", "id_sets": rs[0]["id_sets"], "ood_sets": rs[0]["ood_sets"],
             "sets": {s: {"accuracy": agg([r["sets"].get(s, {}).get("accuracy") for r in rs], pct)}
                      for s in rs[0]["sets"]}}
        for key in ("id_avg", "ood_avg"):
            g[key] = agg([r.get(key) for r in rs], pct)
        g["mean_tokens"] = agg([r.get("mean_tokens") for r in rs], lambda v: f"{v:.1f}")
        g["train_wall_time_s"] = agg([r.get("train_wall_time_s") for r in rs], lambda v: f"{v:.0f}s")
        g["overconfidence"] = {t: {"wrong_among_confident": agg(
            [r["overconfidence"].get(t, {}).get("wrong_among_confident") for r in rs], pct)}
            for t in rs[0].get("overconfidence", {})}
        g["ece"] = agg([r.get("ece") for r in rs], lambda v: f"{v:.3f}")
        out.append(g)
    return out


def comparison_table(runs, thresholds=(0.5, 0.7, 0.9)):
    """Paper-style table: one row per run; columns = ID sets, OOD sets, averages, tokens, training
    time, overconfidence (wrong among confident, %) per threshold and ECE. Returns (header, rows)."""
    id_sets, ood_sets = [], []
    for run in runs:
        id_sets += [s for s in run["id_sets"] if s not in id_sets]
        ood_sets += [s for s in run["ood_sets"] if s not in ood_sets and s not in id_sets]
    header = (["method"] + id_sets + ood_sets + ["ID avg", "OOD avg", "tokens", "train time"]
              + [f"OC@{t:g}" for t in thresholds] + ["ECE"])
    rows = []
    for run in runs:
        acc = [_pct(run["sets"][s]["accuracy"]) if s in run["sets"] else "–" for s in id_sets + ood_sets]
        oc = [_pct(run["overconfidence"].get(f"{t:g}", {}).get("wrong_among_confident"))
              for t in thresholds]
        tok = run.get("mean_tokens")
        rows.append([run["run"]] + acc + [_pct(run["id_avg"]), _pct(run["ood_avg"]),
                    "–" if tok is None else tok if isinstance(tok, str) else f"{tok:.1f}",
                    _duration(run.get("train_wall_time_s"))]
                    + oc + ["–" if run["ece"] is None else run["ece"] if isinstance(run["ece"], str)
                            else f"{run['ece']:.3f}"])
    return header, rows


def markdown_table(header, rows):
    cells = [[str(c).replace("|", "\\|") for c in r] for r in [header] + rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) if j == 0 else "-" * (w + 1) + ":"
                         for j, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]]) + "\n"


# -- HTML report with hand-written SVG ------------------------------------------------------------

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# Training-log keys plotted when present (SFT: losses; PPO: reward/score, KL, ...), against "step".
CURVE_KEYS = ["loss", "eval_loss", "eval_accuracy", "score", "reward", "kl", "accuracy", "confidence_bonus",
              "computed_correct_frac", "entropy", "policy_loss", "value_loss", "response_len"]
_esc = html.escape


def nice_ticks(lo, hi, n=5):
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(hi / step + 1e-9) + 1)]


class _Frame:
    """Plot area of an SVG: maps data (x, y) to pixels and draws axes with ticks and labels."""

    def __init__(self, xr, yr, w=380, h=230, left=56, right=14, top=28, bottom=40):
        self.xr, self.yr, self.w, self.h = xr, yr, w, h
        self.x0, self.x1, self.y0, self.y1 = left, w - right, h - bottom, top

    def px(self, x):
        return self.x0 + (x - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.x1 - self.x0)

    def py(self, y):
        return self.y0 - (y - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.y0 - self.y1)

    def axes(self, title, xlabel, ylabel, xticks=True):
        p = [f'<text x="{self.w / 2:.0f}" y="16" class="title">{_esc(title)}</text>',
             f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x1}" y2="{self.y0}" class="axis"/>',
             f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x0}" y2="{self.y1}" class="axis"/>',
             f'<text x="{(self.x0 + self.x1) / 2:.0f}" y="{self.h - 6}" class="label">{_esc(xlabel)}</text>',
             f'<text x="12" y="{(self.y0 + self.y1) / 2:.0f}" class="label" transform="rotate(-90 12 '
             f'{(self.y0 + self.y1) / 2:.0f})">{_esc(ylabel)}</text>']
        for t in nice_ticks(*self.yr):
            y = self.py(t)
            p.append(f'<line x1="{self.x0 - 4}" y1="{y:.1f}" x2="{self.x1}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{self.x0 - 6}" y="{y + 4:.1f}" class="ytick">{t:g}</text>')
        for t in nice_ticks(*self.xr) if xticks else []:
            x = self.px(t)
            p.append(f'<line x1="{x:.1f}" y1="{self.y0}" x2="{x:.1f}" y2="{self.y0 + 4}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{self.y0 + 16}" class="xtick">{t:g}</text>')
        return p

    def svg(self, parts):
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}">' + "".join(parts) + "</svg>")


def _span(values):
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
    return lo, hi


def svg_line_plot(xs, ys, title, xlabel="step", ylabel="", color=COLORS[0], max_points=1000):
    """One curve as a polyline over axes with ticks; "" when there is nothing finite to plot."""
    pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return ""
    stride = max(1, math.ceil(len(pts) / max_points))
    pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    lo, hi = _span([p[1] for p in pts])
    f = _Frame(_span([p[0] for p in pts]), (lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)))
    parts = f.axes(title, xlabel, ylabel or title)
    coords = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in pts)
    parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    return f.svg(parts)


def svg_grouped_bars(groups, series, title, ylabel="accuracy (%)"):
    """Grouped bars: one group per label in `groups`, one bar per (name, values) in `series`,
    values as fractions in [0, 1] (None = missing); drawn in percent."""
    w = max(380, 90 + len(groups) * (14 * len(series) + 16))
    f = _Frame((0, len(groups)), (0, 100), w=w, h=260, bottom=56)
    parts = f.axes(title, "", ylabel, xticks=False)
    gw = (f.x1 - f.x0) / max(len(groups), 1)
    bw = (gw - 12) / max(len(series), 1)
    for g, name in enumerate(groups):
        xc = f.x0 + (g + 0.5) * gw
        parts.append(f'<text x="{xc:.1f}" y="{f.y0 + 16}" class="xtick">{_esc(name)}</text>')
        for s, (label, values) in enumerate(series):
            v = values[g]
            if v is None:
                continue
            x, y = f.x0 + g * gw + 6 + s * bw, f.py(100 * v)
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{f.y0 - y:.1f}" '
                         f'fill="{COLORS[s % len(COLORS)]}"><title>{_esc(label)} {_esc(name)}: '
                         f'{100 * v:.1f}%</title></rect>')
    x = f.x0
    for s, (label, _) in enumerate(series):  # legend under the axis
        parts.append(f'<rect x="{x}" y="{f.h - 22}" width="10" height="10" '
                     f'fill="{COLORS[s % len(COLORS)]}"/><text x="{x + 14}" y="{f.h - 13}" '
                     f'class="legend">{_esc(label)}</text>')
        x += 30 + 7 * len(label)
    return f.svg(parts)


def svg_reliability(bins, title):
    """Reliability diagram: accuracy per confidence bin (bars) against the diagonal."""
    f = _Frame((0, 1), (0, 1), w=300, h=260)
    parts = f.axes(title, "confidence", "accuracy")
    parts.append(f'<line x1="{f.px(0):.1f}" y1="{f.py(0):.1f}" x2="{f.px(1):.1f}" y2="{f.py(1):.1f}" '
                 'class="diag"/>')
    for b in bins:
        if not b["count"]:
            continue
        x, y = f.px(b["lo"]), f.py(b["accuracy"])
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{f.px(b["hi"]) - x - 2:.1f}" '
                     f'height="{f.y0 - y:.1f}" fill="{COLORS[0]}" fill-opacity="0.75"><title>'
                     f'[{b["lo"]:g}, {b["hi"]:g}): n={b["count"]}, acc={b["accuracy"]:.3f}, '
                     f'conf={b["mean_confidence"]:.3f}</title></rect>')
    return f.svg(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}svg{margin:4px;background:#fff}
.title{font-size:13px;text-anchor:middle;font-weight:600}.label{font-size:11px;text-anchor:middle}
.xtick{font-size:10px;text-anchor:middle}.ytick{font-size:10px;text-anchor:end}.legend{font-size:11px}
.axis{stroke:#333}.grid{stroke:#e4e4e4}.diag{stroke:#888;stroke-dasharray:4 3}.note{color:#666}"""


def decoding(run):
    c = run.get("config") or {}
    if c.get("greedy", True):
        return "greedy"
    return f"sampled, {c.get('n_samples', 1)} per problem, temperature {c.get('temperature', 1.0):g}"


def write_report(path, runs, thresholds=(0.5, 0.7, 0.9)):
    """One self-contained HTML file (inline CSS and SVG, no script): comparison table, accuracy per
    set, training curves from each run's <ckpt>/metrics.jsonl, reliability diagrams."""
    header, rows = comparison_table(runs, thresholds)
    table = ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
             + "</table>")
    groups = [h for h in header[1:header.index("OOD avg") + 1]]
    key = {"ID avg": "id_avg", "OOD avg": "ood_avg"}
    series = [(run["run"], [run[key[g]] if g in key else run["sets"].get(g, {}).get("accuracy")
                            for g in groups]) for run in runs]
    curves = []
    for i, run in enumerate(runs):
        log = read_train_log(run["ckpt"]) if run.get("ckpt") else []
        plots = []
        for k in CURVE_KEYS:
            pts = [(r.get("step", j), r[k]) for j, r in enumerate(log)
                   if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            plots.append(svg_line_plot([p[0] for p in pts], [p[1] for p in pts], k,
                                       color=COLORS[i % len(COLORS)]) if pts else "")
        body = "".join(plots) or '<p class="note">no training log (metrics.jsonl) found</p>'
        curves.append(f"<h3>{_esc(run['run'])}</h3><div>{body}</div>")
    rel = "".join(svg_reliability(run["reliability"], f"{run['run']}  (ECE "
                                  f"{'–' if run['ece'] is None else format(run['ece'], '.3f')}, "
                                  f"n={run.get('n_computed_numbers', '?')})") for run in runs)
    bars = svg_grouped_bars(groups, series, "accuracy per set")
    runs_list = "".join(f"<li>{_esc(r['run'])}: {_esc(str(r.get('ckpt', '?')))}, {_esc(decoding(r))}</li>"
                        for r in runs)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title><style>{CSS}</style></head>
<body><h1>Evaluation report</h1>
<p class="note">Accuracy in %. OC@&tau;: wrong computed
numbers with confidence &gt; &tau; over all computed numbers with confidence &gt; &tau; (%).
ECE over computed numbers, {len(runs[0]['reliability']) if runs else 10} equal-width bins.
Tokens: generated tokens per response. Train time: last <code>wall_time_s</code> in the
checkpoint's metrics.jsonl, plus that of the SFT checkpoint an RL run started from.</p>
<section id="table"><h2>Comparison</h2>{table}<ul>{runs_list}</ul></section>
<section id="accuracy"><h2>Accuracy per set</h2>{bars}</section>
<section id="curves"><h2>Training curves</h2>{"".join(curves)}</section>
<section id="reliability"><h2>Reliability diagrams</h2><p class="note">Computed numbers of all sets,
accuracy per confidence bin; the dashed line is perfect calibration.</p>{rel}</section>
</body></html>
"""
    write_atomic(path, doc)


# -- I/O and CLI ----------------------------------------------------------------------------------

def write_atomic(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_train_log(ckpt):
    """Rows of <ckpt>/metrics.jsonl ([] when absent). A last line without its newline (a run
    killed mid-write) is skipped; any other bad line is an error."""
    path = Path(ckpt) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise EvalError(f"{path}:{n}: not a JSON object line") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def train_wall_time(log):
    """Training wall time in seconds: the last `wall_time_s` logged, None when never logged."""
    times = [r["wall_time_s"] for r in log if isinstance(r.get("wall_time_s"), (int, float))]
    return float(times[-1]) if times else None


def train_stages(ckpt):
    """[(checkpoint, wall time s)] of the post-training stages behind a checkpoint: itself, and for
    an RL checkpoint (ppo_config.json) also the SFT checkpoint it started from, so that CoMT+CCRL
    is timed as SFT + RL, as in the paper's comparison. The base model is not a stage."""
    stages = [(str(ckpt), train_wall_time(read_train_log(ckpt)))]
    ppo_cfg = Path(ckpt) / "ppo_config.json"
    if ppo_cfg.is_file():
        init = json.loads(ppo_cfg.read_text(encoding="utf-8")).get("init")
        if init and (Path(init) / "metrics.jsonl").is_file():
            stages.append((init, train_wall_time(read_train_log(init))))
    return stages


def load_metrics(spec, out):
    """A metrics.json given as its path, a run directory, or a run name under `out`."""
    p = Path(spec)
    path = p if p.is_file() else p / "metrics.json" if p.is_dir() else Path(out) / spec / "metrics.json"
    if not path.is_file():
        raise EvalError(f"no metrics.json for {spec!r} (looked for {path})")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("run", "sets", "id_sets", "ood_sets", "id_avg", "ood_avg", "overconfidence",
                           "ece", "reliability") if not isinstance(m, dict) or k not in m]
    if missing:
        raise EvalError(f"{path}: not an eval metrics.json (missing {', '.join(missing)})")
    return m


def run_eval(cfg):
    """Evaluate every checkpoint on every set; returns the runs' metrics dicts."""
    names = cfg.names or [Path(c).resolve().name for c in cfg.ckpt]
    if len(names) != len(cfg.ckpt):
        raise EvalError(f"--names gives {len(names)} names for {len(cfg.ckpt)} --ckpt directories; expected one each")
    if len(set(names)) != len(names):
        raise EvalError(f"run names {names} must be distinct, one per --ckpt "
                        f"({'give other --names' if cfg.names else 'checkpoints with one directory name: use --names'})")
    for c in cfg.ckpt:
        if not (Path(c) / "config.json").is_file():
            raise EvalError(f"checkpoint not found: {c} (expected a directory with config.json)")
    set_names = [Path(s).stem for s in cfg.sets]
    if len(set(set_names)) != len(set_names):
        raise EvalError(f"problem sets need distinct file names, got {set_names}")
    if not cfg.sets:
        raise EvalError("no problem sets given (expected --sets FILE.jsonl ...)")
    if cfg.greedy and cfg.n_samples > 1:
        raise EvalError("--n-samples > 1 needs sampling: add --no-greedy")
    import torch
    from model import Transformer, resolve_device
    from tokenizer import Tokenizer
    device = resolve_device(cfg.device)
    # data.load_problems checks every line (a question and a numeric answer) before anything runs
    problems = {n: data.load_problems(s) for n, s in zip(set_names, cfg.sets)}
    toks = [Tokenizer.load(c) for c in cfg.ckpt]
    if cfg.limit:
        problems = {n: p[:cfg.limit] for n, p in problems.items()}
    if cfg.given_plan:
        for n, probs in problems.items():
            bad = next((p for p in probs if not isinstance(p.get("program"), dict)), None)
            if bad is not None:
                raise EvalError(f"--given-plan: problem {bad.get('id')!r} of set {n} has no 'program' "
                                f"(expected world problems, which carry their computation graph)")
    id_sets = [n for n in set_names if n.startswith("test_id") or n in cfg.id_sets]
    runs = []
    for name, ckpt, tok in zip(names, cfg.ckpt, toks):
        torch.manual_seed(cfg.seed)
        model = Transformer.from_pretrained(ckpt, device=device).eval()
        t0, set_records = time.time(), {}
        for sname, probs in problems.items():
            print(f"{name}: {sname} ({len(probs)} problems)", file=sys.stderr)
            set_records[sname] = evaluate(model, tok, probs, cfg.batch_size, cfg.max_new_tokens,
                                          cfg.greedy, cfg.n_samples, cfg.temperature,
                                          cfg.confidence_kind, given_plan=cfg.given_plan,
                                          compile=cfg.compile)["records"]
        if cfg.arithmetic:
            print(f"{name}: arithmetic probe ({cfg.arithmetic} per cell)", file=sys.stderr)
        m = {"run": name, "ckpt": str(ckpt), **summarize_run(set_records, id_sets, cfg.thresholds,
                                                              cfg.n_bins),
             "arithmetic": arithmetic_accuracy(model, tok, cfg.arithmetic, cfg.seed) if cfg.arithmetic else None,
             "train_stages": train_stages(ckpt),
             "train_wall_time_s": _sum_or_none(t for _, t in train_stages(ckpt)),
             "eval_wall_time_s": time.time() - t0, "config": asdict(cfg)}
        rundir = Path(cfg.out) / name
        write_atomic(rundir / "samples.jsonl", "".join(
            json.dumps({"set": s, **r}) + "\n" for s, recs in set_records.items() for r in recs))
        write_atomic(rundir / "metrics.json", json.dumps(m, indent=1) + "\n")
        runs.append(m)
        del model
    return runs


def parse_args(argv=None):
    """Flags mirror EvalConfig: --max-new-tokens for max_new_tokens, lists take several values."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data.config_flags(p, EvalConfig)
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    cfg.thresholds = tuple(cfg.thresholds)
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    try:
        if bool(cfg.ckpt) == bool(cfg.compare):
            raise EvalError("give either --ckpt CKPT... --sets FILE... or --compare METRICS...")
        if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or cfg.n_samples < 1 or cfg.n_bins < 1:
            raise EvalError("--batch-size, --max-new-tokens, --n-samples and --n-bins must be >= 1")
        if cfg.confidence_kind not in ("exp", "norm"):
            raise EvalError(f"--confidence-kind: expected exp or norm, got {cfg.confidence_kind!r}")
        if cfg.limit < 0 or cfg.arithmetic < 0:
            raise EvalError(f"--limit {cfg.limit} --arithmetic {cfg.arithmetic}: expected counts >= 0 (0 = all / none)")
        if not all(0 <= t < 1 for t in cfg.thresholds):
            raise EvalError(f"--thresholds {' '.join(map(str, cfg.thresholds))}: expected confidences in [0, 1)")
        if not cfg.greedy and not cfg.temperature > 0:
            raise EvalError(f"--temperature {cfg.temperature}: expected a positive number when sampling")
        if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise EvalError(f"--out {cfg.out}: exists and is not a directory; expected a directory to write into")
        if cfg.report and Path(cfg.report).is_dir():
            raise EvalError(f"--report {cfg.report}: is a directory; expected the path of the HTML file to write")
        runs = ([load_metrics(s, cfg.out) for s in cfg.compare] if cfg.compare else run_eval(cfg))
        if len({r["run"] for r in runs}) != len(runs):
            raise EvalError(f"runs to compare need distinct names, got {[r['run'] for r in runs]}")
        header, rows = comparison_table(group_by_seed(runs) if cfg.group_seeds else runs, cfg.thresholds)
        table = markdown_table(header, rows)
        if any(r.get("arithmetic") for r in runs):
            table += "\nArithmetic (greedy, bare 'a op b =' prompts):\n\n" + markdown_table(*arithmetic_table(runs))
        print(table, end="")
        write_atomic(Path(cfg.out) / "table.md", table)
        report = cfg.report or str(Path(cfg.out) / "report.html")
        write_report(report, runs, cfg.thresholds)
        print(f"wrote {Path(cfg.out) / 'table.md'} and {report}", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
