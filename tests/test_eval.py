"""eval.py: metrics against hand computation, pass@k, the table, the HTML report, the CLI, evaluate()."""
import itertools
import json
import math
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as ev
import model as model_py
from tokenizer import Tokenizer, train_bpe

ROOT = Path(__file__).resolve().parent.parent

# A crafted set of computed numbers: (confidence, correct). Boundaries 0.5 and 0.9 are not "> tau".
CRAFTED = [(0.95, False), (0.92, True), (0.8, False), (0.75, True), (0.6, False), (0.55, True),
           (0.4, False), (0.2, True), (0.5, False), (0.9, False)]


def crafted_records():
    return [{"confidence": c, "correct": y} for c, y in CRAFTED]


@pytest.mark.parametrize("tau, n_conf, n_both, among_conf, among_wrong", [
    (0.5, 7, 4, 4 / 7, 4 / 6),  # > 0.5: .95W .92C .8W .75C .6W .55C .9W; wrong overall: 6
    (0.7, 5, 3, 3 / 5, 3 / 6),  # > 0.7: .95W .92C .8W .75C .9W
    (0.9, 2, 1, 1 / 2, 1 / 6),  # > 0.9: .95W .92C
])
def test_overconfidence_by_hand(tau, n_conf, n_both, among_conf, among_wrong):
    r = ev.overconfidence_rate(crafted_records(), tau)
    assert (r["n_numbers"], r["n_confident"], r["n_wrong"], r["n_wrong_confident"]) == (10, n_conf, 6, n_both)
    assert r["wrong_among_confident"] == pytest.approx(among_conf, abs=1e-15)
    assert r["confident_among_wrong"] == pytest.approx(among_wrong, abs=1e-15)


def test_overconfidence_empty_denominators():
    r = ev.overconfidence_rate([], 0.5)
    assert r["wrong_among_confident"] is None and r["confident_among_wrong"] is None
    r = ev.overconfidence_rate([{"confidence": 0.99, "correct": True}, {"confidence": 0.1, "correct": True}], 0.5)
    assert r["wrong_among_confident"] == 0.0 and r["confident_among_wrong"] is None
    r = ev.overconfidence_rate([{"confidence": 0.3, "correct": False}], 0.5)
    assert r["wrong_among_confident"] is None and r["confident_among_wrong"] == 0.0


def test_ece_and_bins_by_hand():
    conf = [0.15, 0.18, 0.62, 0.65, 0.68, 0.95, 1.0]
    corr = [False, True, True, True, False, True, True]
    bins = ev.reliability_bins(conf, corr, 10)
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 0, 3, 0, 0, 2]
    assert bins[1]["mean_confidence"] == pytest.approx(0.165) and bins[1]["accuracy"] == 0.5
    assert bins[6]["mean_confidence"] == pytest.approx(0.65) and bins[6]["accuracy"] == pytest.approx(2 / 3)
    assert bins[9]["mean_confidence"] == pytest.approx(0.975) and bins[9]["accuracy"] == 1.0
    assert bins[0]["accuracy"] is None and bins[0]["lo"] == 0.0 and bins[9]["hi"] == 1.0
    # (2 * |0.5 - 0.165| + 3 * |2/3 - 0.65| + 2 * |1 - 0.975|) / 7 = (0.67 + 0.05 + 0.05) / 7
    assert ev.expected_calibration_error(conf, corr, 10) == pytest.approx(0.11, abs=1e-12)
    assert ev.expected_calibration_error([], [], 10) is None
    assert [b["count"] for b in ev.reliability_bins([0.0, 1.0], [1, 0], 4)] == [1, 0, 0, 1]
    with pytest.raises(ValueError):
        ev.reliability_bins([1.2], [True])
    with pytest.raises(ValueError):
        ev.reliability_bins([float("nan")], [True])


def test_ece_against_numpy_reference():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 500)
    corr = rng.uniform(0, 1, 500) < conf ** 2
    idx = np.clip(np.floor(conf * 15).astype(int), 0, 14)
    ref = sum((idx == b).sum() / 500 * abs(corr[idx == b].mean() - conf[idx == b].mean())
              for b in range(15) if (idx == b).any())
    assert ev.expected_calibration_error(conf.tolist(), corr.tolist(), 15) == pytest.approx(ref, abs=1e-12)


def test_pass_at_k_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 1, 4)


def test_correctness_variance_by_hand_and_unbiased():
    # p = 7/14 = 0.5; within-problem terms c(n-c)/(n(n-1)): 0, 0, 4/12, 1/2
    v = ev.correctness_variance([(4, 0), (4, 4), (4, 2), (2, 1)])
    assert v["total"] == pytest.approx(0.25) and v["within"] == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert v["share"] == pytest.approx((1 / 3 + 1 / 2) / 4 / 0.25) and v["mixed"] == pytest.approx(0.5)
    assert ev.correctness_variance([(1, 1), (1, 0)]) is None  # one sample per problem: no within-problem spread
    # Unbiased: two samples per problem, p_i uniform on [0, 1]: E p(1 - p) = 1/6 (the plain p_hat(1 - p_hat)
    # of two samples would give half of that); and with every problem at the same p, all the variance is within.
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    v = ev.correctness_variance([(2, int(c)) for c in rng.binomial(2, p)])
    assert v["within"] == pytest.approx(1 / 6, abs=0.005) and v["share"] == pytest.approx(2 / 3, abs=0.02)
    v = ev.correctness_variance([(8, int(c)) for c in rng.binomial(8, 0.3, size=20000)])
    assert v["share"] == pytest.approx(1.0, abs=0.02)


def fake_records(rng, n_problems, n_samples):
    recs = []
    for i in range(n_problems):
        resp = []
        for _ in range(n_samples):
            nums = [{"value": rng.randint(0, 99), "correct": rng.random() < 0.6,
                     "confidence": rng.random()} for _ in range(rng.randint(0, 3))]
            pred = None if rng.random() < 0.2 else str(rng.randint(0, 9))
            resp.append({"text": "...", "pred": pred, "correct": pred == "3",
                         "n_tokens": rng.randint(1, 50), "eos": rng.random() < 0.9, "computed_numbers": nums})
        recs.append({"id": i, "question": "q", "gold": "3", "responses": resp})
    return recs


def test_summaries_are_consistent():
    rng = random.Random(1)
    recs = fake_records(rng, 12, 4)
    s = ev.summarize_set(recs)
    resp = [r for p in recs for r in p["responses"]]
    assert s["accuracy"] == sum(r["correct"] for r in resp) / 48
    assert s["mean_tokens"] == sum(r["n_tokens"] for r in resp) / 48
    assert s["parsable_rate"] == sum(r["pred"] is not None for r in resp) / 48
    assert s["eos_rate"] == sum(r["eos"] for r in resp) / 48
    assert set(s["pass_at_k"]) == {"1", "2", "4"}
    assert s["pass_at_k"]["1"] == pytest.approx(s["accuracy"])  # unbiased pass@1 = mean accuracy
    nums = [x for r in resp for x in r["computed_numbers"]]
    assert s["n_computed_numbers"] == len(nums) > 0
    assert s["overconfidence"]["0.7"] == ev.overconfidence_rate(nums, 0.7)
    run = ev.summarize_run({"test_id": recs[:6], "ood_a": recs[6:], "ood_b": recs[:3]}, ["test_id"])
    assert run["id_sets"] == ["test_id"] and run["ood_sets"] == ["ood_a", "ood_b"]
    assert run["id_avg"] == run["sets"]["test_id"]["accuracy"]
    assert run["ood_avg"] == pytest.approx((run["sets"]["ood_a"]["accuracy"] + run["sets"]["ood_b"]["accuracy"]) / 2)
    pooled = [x for p in recs[:6] + recs[6:] + recs[:3] for r in p["responses"] for x in r["computed_numbers"]]
    assert run["overconfidence"]["0.5"] == ev.overconfidence_rate(pooled, 0.5)


def fake_metrics(name, ckpt, accs, id_sets, oc, ece, tokens, wall):
    sets = {s: {"accuracy": a} for s, a in accs.items()}
    return {"run": name, "ckpt": str(ckpt), "sets": sets, "id_sets": id_sets,
            "ood_sets": [s for s in accs if s not in id_sets],
            "id_avg": ev._mean(accs[s] for s in id_sets),
            "ood_avg": ev._mean(a for s, a in accs.items() if s not in id_sets),
            "mean_tokens": tokens, "train_wall_time_s": wall, "n_computed_numbers": 7,
            "overconfidence": {k: {"wrong_among_confident": v} for k, v in oc.items()}, "ece": ece,
            "reliability": ev.reliability_bins([0.15, 0.18, 0.62, 0.65, 0.68, 0.95, 1.0],
                                               [False, True, True, True, False, True, True])}


def write_runs(tmp_path):
    comt = tmp_path / "ckpt" / "comt"
    ppo = tmp_path / "ckpt" / "comt_ccrl"
    comt.mkdir(parents=True)
    ppo.mkdir(parents=True)
    (comt / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 / (s + 1), "lr": 1e-3,
                                                            "wall_time_s": 2.0 * s}) + "\n" for s in range(50)))
    (ppo / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": s / 10, "kl": 0.01 * s,
                                                           "wall_time_s": 30.0 * s}) + "\n" for s in range(20))
                                       + '{"step": 20, "rew')  # a run killed mid-write
    runs = [fake_metrics("comt", comt, {"test_id": 0.5, "ood_hard": 0.25, "ood_steps": 0.125}, ["test_id"],
                         {"0.5": 0.4, "0.7": 0.3, "0.9": None}, 0.11, 40.25, 98.0),
            fake_metrics("<ccrl & co>", ppo, {"test_id": 0.75, "ood_hard": 0.5}, ["test_id"],
                         {"0.5": 0.2, "0.7": 0.1, "0.9": 0.0}, 0.05, 30.0, 570.0)]
    out = tmp_path / "out"
    for r in runs:
        d = out / r["run"].strip("<>").replace(" ", "_")
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(r))
    return out, runs


def test_compare_table(tmp_path, capsys):
    out, runs = write_runs(tmp_path)
    paths = sorted(str(p) for p in out.glob("*/metrics.json"))[::-1]  # comt first
    assert ev.main(["--compare", *paths, "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert capsys.readouterr().out == md
    lines = [[c.strip() for c in l.strip("|").split(" | ")] for l in md.splitlines()]
    assert lines[0] == ["method", "test_id", "ood_hard", "ood_steps", "ID avg", "OOD avg", "tokens",
                        "train time", "OC@0.5", "OC@0.7", "OC@0.9", "ECE"]
    assert lines[2] == ["comt", "50.0", "25.0", "12.5", "50.0", "18.8", "40.2", "98 s", "40.0", "30.0", "–", "0.110"]
    assert lines[3] == ["<ccrl & co>", "75.0", "50.0", "–", "75.0", "50.0", "30.0", "9.5 min", "20.0", "10.0",
                        "0.0", "0.050"]
    assert (out / "report.html").is_file()
    assert ev.main(["--compare", "comt", "--out", str(out)]) == 0  # a run name under --out


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.tags, self.stack, self.headings, self._h = set(), [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.ids.update(v for k, v in attrs if k == "id")
        if tag in ("h1", "h2", "h3"):
            self._h = ""

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3"):
            self.headings.append(self._h)
            self._h = None

    def handle_data(self, data):
        if self._h is not None:
            self._h += data


def test_report_sections_and_svg(tmp_path):
    _, runs = write_runs(tmp_path)
    runs.append(fake_metrics("nolog", tmp_path / "missing", {"test_id": 0.1}, ["test_id"], {}, None, None, None))
    path = tmp_path / "r" / "report.html"
    ev.write_report(path, runs)
    text = path.read_text()
    assert not (tmp_path / "r" / "report.html.tmp").exists()
    p = Collect()
    p.feed(text)
    assert {"table", "accuracy", "curves", "reliability"} <= p.ids
    assert {"comt", "<ccrl & co>", "nolog"} <= set(p.headings)  # run names, unescaped back
    assert "<ccrl" not in text.replace("&lt;ccrl", "")  # the name is escaped everywhere
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)
    trees = [ET.fromstring(s) for s in svgs]  # every SVG is well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.find(f"{ns}text").text for t in trees]
    # comt: loss (lr is not in the known list); ccrl: reward and kl; 1 bar chart; 3 reliability plots
    assert titles.count("loss") == 1 and titles.count("reward") == 1 and titles.count("kl") == 1
    assert len(trees) == 1 + 3 + 3
    curves = [t for t in trees if t.find(f"{ns}text").text in ("loss", "reward", "kl")]
    assert all(len(t.findall(f"{ns}polyline")) == 1 for t in curves)
    loss_pts = curves[0].find(f"{ns}polyline").get("points").split()
    assert len(loss_pts) == 50
    reward_pts = curves[1].find(f"{ns}polyline").get("points").split()
    assert len(reward_pts) == 20  # the torn last line is skipped
    bars = trees[0]
    assert len(bars.findall(f"{ns}rect")) == (5 + 4 + 2) + 3  # bars present (+ one legend box per run)
    rel = trees[-1]
    assert len(rel.findall(f"{ns}rect")) == 3  # three non-empty bins
    assert "no training log" in text


def test_nice_ticks():
    assert ev.nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert ev.nice_ticks(0, 100) == [0, 25, 50, 75, 100]
    assert ev.nice_ticks(3.2, 9.7) == [4, 6, 8]
    assert ev.nice_ticks(-0.013, 0.048) == [0.0, 0.02, 0.04]  # step 0.02 (raw 0.0152)
    assert ev.nice_ticks(-0.01, 0.03) == [-0.01, 0.0, 0.01, 0.02, 0.03]  # ends included


def test_train_log_errors(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "wall_time_s": 5}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2:"):
        ev.read_train_log(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "wall_time_s": 5}\n{"step": 2, "wall_time_s": 9.5}\n'
                                            '{"step": 3}\n')
    assert ev.train_wall_time(ev.read_train_log(tmp_path)) == 9.5
    assert ev.read_train_log(tmp_path / "nowhere") == []
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "metrics.jsonl").write_text('{"step": 1, "wall_time_s": 40.5}\n')
    (ppo / "ppo_config.json").write_text(json.dumps({"init": str(tmp_path)}))
    assert ev.train_stages(ppo) == [(str(ppo), 40.5), (str(tmp_path), 9.5)]  # RL time + its SFT init's
    assert ev.train_stages(tmp_path) == [(str(tmp_path), 9.5)]


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_cli_missing_checkpoint(tmp_path):
    (tmp_path / "test_id.jsonl").write_text('{"question": "2 apples?", "answer": "2"}\n')
    r = cli("--ckpt", "ckpt/nothing", "--sets", "test_id.jsonl", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: checkpoint not found: ckpt/nothing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, expect", [
    (["--limit", "-1"], "--limit -1"),                          # a negative count would slice off the end
    (["--thresholds", "0.5", "1.5"], "--thresholds 0.5 1.5: expected confidences in [0, 1)"),
    (["--names", "a", "b"], "--names gives 2 names for 1 --ckpt"),
    (["--no-greedy", "--temperature", "0"], "--temperature 0.0"),
    (["--out", "taken.txt"], "--out taken.txt: exists and is not a directory"),
    (["--device", "tpu"], "--device tpu: expected auto, cpu or cuda"),
])
def test_cli_bad_flags_one_line_exit_2(tmp_path, capsys, args, expect):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (tmp_path / "taken.txt").write_text("keep")
    (tmp_path / "test_id.jsonl").write_text('{"question": "2 apples?", "answer": "2"}\n')
    r = cli("--ckpt", "ck", "--sets", "test_id.jsonl", *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert expect in r.stderr, r.stderr
    assert (tmp_path / "taken.txt").read_text() == "keep" and not (tmp_path / "out").exists()


def test_cli_problems_without_answer_writes_nothing(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    sets = tmp_path / "ood.jsonl"
    sets.write_text('{"question": "a?", "answer": "1"}\n\n{"question": "b?"}\n')
    out = tmp_path / "out"
    (out / "ck").mkdir(parents=True)
    (out / "ck" / "metrics.json").write_text("previous")
    assert ev.main(["--ckpt", str(ck), "--sets", str(sets), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sets}:3: ") and "'answer'" in err and err.count("\n") == 1
    assert (out / "ck" / "metrics.json").read_text() == "previous"
    assert sorted(p.name for p in out.rglob("*")) == ["ck", "metrics.json"]
    capsys.readouterr()
    assert ev.main(["--compare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no metrics.json for" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"run": "x"}')
    assert ev.main(["--compare", str(tmp_path / "other.json"), "--out", str(out)]) == 2
    assert "not an eval metrics.json (missing sets, id_sets" in capsys.readouterr().err
    sets.write_text('{"question": "a?", "answer": "1"}\n')
    assert ev.main(["--ckpt", str(ck), "--sets", str(sets), "--n-samples", "4", "--out", str(out)]) == 2
    assert "--no-greedy" in capsys.readouterr().err
    assert ev.main(["--ckpt", str(ck), "--sets", str(sets), str(sets), "--out", str(out)]) == 2
    assert "distinct file names" in capsys.readouterr().err
    assert (out / "ck" / "metrics.json").read_text() == "previous"


# -- evaluate(): the glue, with a scripted generate(), and end to end with a tiny random model ----

QUESTION = "Tom has 3 boxes of 12 apples. He eats 5 of them. How many are left?"
PROBLEMS = [{"id": "p0", "question": QUESTION, "answer": "31", "intermediates": ["36"]},
            {"id": "p1", "question": QUESTION.replace("3 boxes", "2 boxes"), "answer": "19", "intermediates": ["24"]},
            {"id": "p2", "question": "What is 2 plus 2?", "answer": "4", "intermediates": []}]
# (response text, ends with EOS, entropy of every token) per problem
SCRIPT = [("3 * 12 = 36. 36 - 5 = 31.\nThe answer is 31.", True, 0.1),
          ("2 * 12 = 25. 25 - 5 = 20.\nThe answer is 20.", False, 1.0),
          ("I do not know.", True, 0.3)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"Question: {p['question']}\n{s[0]}" for p, s in zip(PROBLEMS, SCRIPT)] * 3
    d = tmp_path_factory.mktemp("tok")
    train_bpe(texts, 300).save(d)
    return Tokenizer.load(d)


def scripted_generate(tok, calls):
    def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(), pad_id=0,
                 compile=False):
        calls.append((prompts, temperature, set(stop_ids), pad_id))
        rows = []
        for p in prompts:
            i = next(k for k, q in enumerate(PROBLEMS) if tok.render(f"Question: {q['question']}\n")[0] == p)
            text, eos, h = SCRIPT[i]
            rows.append((tok.encode(text) + ([tok.eos_id] if eos else []), eos, h))
        n = max(len(r[0]) for r in rows) + 2
        tokens = torch.full((len(rows), n), pad_id)
        mask, ent = torch.zeros(len(rows), n, dtype=torch.long), torch.zeros(len(rows), n)
        for b, (ids, _, h) in enumerate(rows):
            tokens[b, :len(ids)], mask[b, :len(ids)], ent[b, :len(ids)] = torch.tensor(ids), 1, h
        return model_py.Generation(tokens, torch.zeros(len(rows), n), ent, mask,
                                   torch.tensor([r[1] for r in rows]))
    return generate


def test_evaluate_glue_with_scripted_generate(tok, monkeypatch):
    calls = []
    monkeypatch.setattr(model_py, "generate", scripted_generate(tok, calls))
    res = ev.evaluate(None, tok, PROBLEMS, batch_size=2, max_new_tokens=64, progress=False)
    assert [len(c[0]) for c in calls] == [2, 1] and all(c[1] == 0.0 for c in calls)  # greedy, batched
    assert calls[0][2] == tok.stop_ids and calls[0][3] == tok.pad_id
    r0, r1, r2 = (p["responses"][0] for p in res["records"])
    assert (r0["pred"], r0["correct"], r0["eos"], r0["text"]) == ("31", True, True, SCRIPT[0][0])
    assert (r1["pred"], r1["correct"], r1["eos"]) == ("20", False, False)
    assert (r2["pred"], r2["correct"]) == (None, False)
    assert r0["n_tokens"] == len(tok.encode(SCRIPT[0][0])) + 1 and r1["n_tokens"] == len(tok.encode(SCRIPT[1][0]))
    # computed numbers: first occurrences of values not in the question; 24 is p1's gold, 25 and 20 are not
    assert [(x["value"], x["correct"]) for x in r0["computed_numbers"]] == [(36, True), (31, True)]
    assert [(x["value"], x["correct"]) for x in r1["computed_numbers"]] == [(25, False), (20, False)]
    assert r2["computed_numbers"] == []
    assert all(x["confidence"] == pytest.approx(np.exp(-0.1)) for x in r0["computed_numbers"])
    assert all(x["confidence"] == pytest.approx(np.exp(-1.0)) for x in r1["computed_numbers"])
    assert res["accuracy"] == pytest.approx(1 / 3) and res["parsable_rate"] == pytest.approx(2 / 3)
    assert res["eos_rate"] == pytest.approx(2 / 3) and res["n_computed_numbers"] == 4
    oc = res["overconfidence"]
    assert oc["0.5"]["wrong_among_confident"] == 0.0 and oc["0.5"]["confident_among_wrong"] == 0.0
    assert oc["0.9"]["n_confident"] == 2  # exp(-0.1) = 0.905 > 0.9
    assert ev.overconfidence_rate(r1["computed_numbers"], 0.3)["wrong_among_confident"] == 1.0
    assert res["ece"] == pytest.approx(0.5 * (1 - np.exp(-0.1)) + 0.5 * np.exp(-1.0))

    calls.clear()
    res = ev.evaluate(None, tok, PROBLEMS, batch_size=4, max_new_tokens=64, greedy=False, n_samples=3,
                      temperature=0.7, progress=False)
    assert [len(c[0]) for c in calls] == [4, 4, 1] and calls[0][1] == 0.7
    assert [len(p["responses"]) for p in res["records"]] == [3, 3, 3]
    assert res["pass_at_k"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(1 / 3), "3": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="sampling"):
        ev.evaluate(None, tok, PROBLEMS, 4, 8, greedy=True, n_samples=2)


def test_each_number_is_scored_with_its_own_tokens_entropies(tok, monkeypatch):
    """Entropies that differ at every token: each computed number's confidence is exp(-mean H) over exactly
    the tokens holding its characters (an off-by-one between tokens and entropies would change it)."""
    text = SCRIPT[0][0]
    ids = tok.encode(text)

    def generate(model, prompts, max_new_tokens, **kw):
        n = len(ids) + 1
        ent = torch.tensor([[0.05 * (j + 1) for j in range(n)]])
        return model_py.Generation(torch.tensor([ids + [tok.eos_id]]), torch.zeros(1, n), ent,
                                   torch.ones(1, n, dtype=torch.long), torch.tensor([True]))

    monkeypatch.setattr(model_py, "generate", generate)
    got = ev.evaluate(None, tok, PROBLEMS[:1], batch_size=1, max_new_tokens=64, progress=False)
    numbers = got["records"][0]["responses"][0]["computed_numbers"]
    ends = np.cumsum([len(tok.decode([i])) for i in ids])  # character span of each token in the text
    starts = ends - [len(tok.decode([i])) for i in ids]
    assert [x["value"] for x in numbers] == [36, 31]
    for x, value in zip(numbers, ("36", "31")):
        m = re.search(rf"\b{value}\b", text)  # first occurrence: later ones are copies
        held = [j for j in range(len(ids)) if starts[j] < m.end() and ends[j] > m.start()]
        assert x["confidence"] == pytest.approx(math.exp(-np.mean([0.05 * (j + 1) for j in held])), rel=1e-6)


@pytest.fixture(autouse=True)
def one_thread():
    # a tiny model on a shared 2-core machine runs faster on one thread than fighting for two
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(tok):
    torch.manual_seed(0)
    cfg = model_py.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=128)
    return model_py.Transformer(cfg).eval()


def test_evaluate_runs_with_a_tiny_random_model(tok):
    res = ev.evaluate(tiny_model(tok), tok, PROBLEMS, batch_size=2, max_new_tokens=12, progress=False)
    resp = [r for p in res["records"] for r in p["responses"]]
    assert len(resp) == 3 and 0.0 <= res["accuracy"] <= 1.0
    assert all(1 <= r["n_tokens"] <= 12 and isinstance(r["text"], str) for r in resp)
    assert all(r["eos"] or r["n_tokens"] == 12 for r in resp)
    assert all(0.0 <= x["confidence"] <= 1.0 for r in resp for x in r["computed_numbers"])
    again = ev.evaluate(tiny_model(tok), tok, PROBLEMS, batch_size=3, max_new_tokens=12, progress=False)
    assert [r["text"] for p in again["records"] for r in p["responses"]] == [r["text"] for r in resp]  # greedy


def test_cli_end_to_end_with_a_saved_tiny_checkpoint(tok, tmp_path, capsys):
    ck = tmp_path / "ckpt" / "tiny"
    tiny_model(tok).save_pretrained(ck)
    tok.save(ck)
    (ck / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "wall_time_s": 1.5}\n'
                                      '{"step": 2, "loss": 4.0, "wall_time_s": 3.25}\n')
    sets = []
    for name, rows in (("test_id", PROBLEMS[:2]), ("ood_x", PROBLEMS)):
        sets.append(str(tmp_path / f"{name}.jsonl"))
        Path(sets[-1]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = ev.main(["--ckpt", str(ck), "--sets", *sets, "--out", str(out), "--max-new-tokens", "6",
                  "--batch-size", "2", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "tiny" / "metrics.json").read_text())
    assert (m["run"], m["id_sets"], m["ood_sets"], m["train_wall_time_s"]) == ("tiny", ["test_id"], ["ood_x"], 3.25)
    assert m["sets"]["test_id"]["n_problems"] == 2 and m["sets"]["ood_x"]["n_responses"] == 3
    assert m["id_avg"] == m["sets"]["test_id"]["accuracy"] and m["config"]["max_new_tokens"] == 6
    samples = [json.loads(l) for l in (out / "tiny" / "samples.jsonl").read_text().splitlines()]
    assert [(s["set"], s["id"]) for s in samples] == [("test_id", "p0"), ("test_id", "p1"), ("ood_x", "p0"),
                                                      ("ood_x", "p1"), ("ood_x", "p2")]
    table = (out / "table.md").read_text()
    assert capsys.readouterr().out == table and table.splitlines()[2].startswith("| tiny ")
    assert "3.2 s" not in table and "3 s" in table  # 3.25 s of training, shown rounded
    assert 'id="curves"' in (out / "report.html").read_text()


def test_arithmetic_items_are_right_and_cover_every_cell():
    items = ev.arithmetic_items(15, seed=3)
    assert len(items) == 4 * len(ev.ARITH_SIZES) * 15
    for op, size, q, c in items:
        a, _, b, eq = q.split()
        a, b = int(a), int(b)
        assert eq == "=" and c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert c >= 0 and (op != "/" or a % b == 0)
    assert ev.arithmetic_items(15, seed=3) == items


def test_arithmetic_probe_runs_on_a_tiny_model(tmp_path, monkeypatch):
    import torch
    from model import CONFIGS, ModelConfig, Transformer
    from tokenizer import train_bpe
    torch.manual_seed(0)
    tok = train_bpe(["12 + 30 = 42\n7 * 6 = 42\n"] * 3, 262)
    model = Transformer(ModelConfig(**{**CONFIGS["tiny"], "vocab_size": 320})).eval()
    res = ev.arithmetic_accuracy(model, tok, n=2, seed=0)
    assert set(res) == set("+-*/") and all(set(v) == set(ev.ARITH_SIZES) for v in res.values())
    assert all(0.0 <= a <= 1.0 for v in res.values() for a in v.values())
    header, rows = ev.arithmetic_table([{"run": "r", "arithmetic": res}])
    assert header[:2] == ["run", "op"] and len(rows) == 4
    # The scoring itself, with a scripted model: right on every "+" item and on the first item of each other
    # cell, off by one elsewhere; so the cells score 1 and 1/4 exactly.
    items = ev.arithmetic_items(4, seed=0)
    first = {(op, size): q for op, size, q, _ in reversed(items)}  # (reversed: the first item of a cell wins)

    def generate(model, prompts, max_new_tokens, **kw):
        rows = []
        for p in prompts:
            op, size, q, c = next(it for it in items if tok.encode(it[2], bos=tok.bos_id is not None) == p)
            right = op == "+" or first[(op, size)] == q
            rows.append(tok.encode(f" {c if right else c + 1}\n"))
        n = max(map(len, rows))
        tokens = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return model_py.Generation(tokens, torch.zeros(len(rows), n), torch.zeros(len(rows), n), mask,
                                   torch.ones(len(rows), dtype=torch.bool))

    monkeypatch.setattr(model_py, "generate", generate)
    res = ev.arithmetic_accuracy(None, tok, n=4, seed=0, batch_size=7)
    assert res == {op: {size: (1.0 if op == "+" else 0.25) for size in ev.ARITH_SIZES} for op in "+-*/"}


def test_group_by_seed_mean_and_std():
    def run(name, acc, tok):
        return {"run": name, "id_sets": ["test_id"], "ood_sets": ["ood_hard"],
                "sets": {"test_id": {"accuracy": acc}, "ood_hard": {"accuracy": acc / 2}},
                "id_avg": acc, "ood_avg": acc / 2, "mean_tokens": tok, "train_wall_time_s": 10.0,
                "overconfidence": {"0.5": {"wrong_among_confident": 0.2}}, "ece": 0.1}
    g = ev.group_by_seed([run("comt_s0", 0.5, 10.0), run("comt_s1", 0.7, 14.0), run("cot_s0", 0.4, 20.0)])
    assert [x["run"] for x in g] == ["comt (n=2)", "cot (n=1)"]
    # mean 60.0, sample std of (50, 70) = 14.142...
    assert g[0]["sets"]["test_id"]["accuracy"] == "60.0 ± 14.1" and g[0]["ood_avg"] == "30.0 ± 7.1"
    assert g[0]["mean_tokens"] == "12.0 ± 2.8" and g[1]["id_avg"] == "40.0 ± 0.0"
    header, rows = ev.comparison_table(g, (0.5,))
    assert rows[0][:4] == ["comt (n=2)", "60.0 ± 14.1", "30.0 ± 7.1", "60.0 ± 14.1"]


def test_given_plan_prompts_hold_the_gold_meta_thought(tok, monkeypatch, tmp_path, capsys):
    import world
    rng, cfg = random.Random(5), world.WorldConfig()
    probs = [world.base_problem(rng, cfg, f"b{i}") for i in range(3)]
    seen = []

    def generate(model, prompts, max_new_tokens, temperature=1.0, stop_ids=(), pad_id=0, **kw):
        seen.extend(prompts)
        n = len(prompts)
        ids = tok.encode("x = 1\nThe answer is 7.") + [tok.eos_id]
        return model_py.Generation(torch.tensor([ids] * n), torch.zeros(n, len(ids)), torch.zeros(n, len(ids)),
                                   torch.ones(n, len(ids), dtype=torch.long), torch.ones(n, dtype=torch.bool))
    monkeypatch.setattr(model_py, "generate", generate)
    ev.evaluate(None, tok, probs, batch_size=2, max_new_tokens=8, progress=False, given_plan=True)
    want = [tok.render(f"Question: {p['question']}\n" + world.program_plan(p["program"]))[0] for p in probs]
    assert seen == want and all(tok.decode(w).endswith("Execution:\n") for w in want)
    seen.clear()
    ev.evaluate(None, tok, probs, batch_size=2, max_new_tokens=8, progress=False)
    assert seen == [tok.render(f"Question: {p['question']}\n")[0] for p in probs]
    # a set without computation graphs: one line, exit 2, nothing written
    ck = tmp_path / "ck"
    tiny_model(tok).save_pretrained(ck)
    tok.save(ck)
    sets = tmp_path / "plain.jsonl"
    sets.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    assert ev.main(["--ckpt", str(ck), "--sets", str(sets), "--given-plan", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --given-plan: problem 'p0' of set plain has no 'program'") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
