"""Tests for world.py and families.py: the embedded world, its splits, base corpus and SFT sets, its CLI."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import confidence
import data
import families
import world as world_py

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(n_train=400, n_test=100, n_ood=80, n_pretrain=600, n_pretrain_test=60)


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(out)  # away from the repository's base/, whose tokenizer the summary would otherwise use
    try:
        summary = world_py.build_world(world_py.WorldConfig(out=str(out), seed=3, **SMALL))
    finally:
        os.chdir(cwd)
    splits = {s: read(out / "world" / f"{s}.jsonl") for s in world_py.SPLITS}
    return {"out": out, "summary": summary, "splits": splits, "pretrain": [r["text"] for r in read(out / "pretrain.jsonl")],
            "pretrain_test": read(out / "pretrain_test.jsonl"), "cot": read(out / "cot.jsonl"),
            "comt": read(out / "comt.jsonl")}


# ----------------------------------------------------------------------------- the embedded world

def test_world_is_deterministic(world, tmp_path):
    world_py.build_world(world_py.WorldConfig(out=str(tmp_path / "a"), seed=3, **SMALL))
    names = ["pretrain.jsonl", "pretrain_test.jsonl", "cot.jsonl", "comt.jsonl"] + [f"world/{s}.jsonl" for s in world_py.SPLITS]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (world["out"] / n).read_bytes(), n
    world_py.build_world(world_py.WorldConfig(out=str(tmp_path / "b"), seed=4, **SMALL))
    assert (tmp_path / "b" / "world/train.jsonl").read_bytes() != (world["out"] / "world/train.jsonl").read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_split_sizes_and_no_test_question_in_train(world):
    s = world["splits"]
    assert [len(s[k]) for k in world_py.SPLITS] == [400, 100] + [80] * 5
    train = {p["question"] for p in s["train"]}
    assert len(train) == 400
    for name in world_py.SPLITS[1:]:
        qs = [p["question"] for p in s[name]]
        assert len(set(qs)) == len(qs) and not train & set(qs), name
        assert all(p["source"] == f"world/{name}" and p["id"].startswith(name) for p in s[name])


def _numbers(p):
    return [n.value for n in confidence.number_spans(p["question"], fractions=True)] + list(map(float, p["intermediates"]))


def test_ood_properties(world):
    s = world["splits"]
    train_max = sorted(max(_numbers(p)) for p in s["train"])
    hard_max = sorted(max(_numbers(p)) for p in s["ood_hard"])
    assert max(train_max) <= 999 and hard_max[len(hard_max) // 2] >= 100 * train_max[len(train_max) // 2] / 2
    assert min(hard_max) > max(train_max)                                # every hard problem leaves the ID range
    assert max(p["steps"] for p in s["train"]) <= 4 < min(p["steps"] for p in s["ood_deep"])
    assert {p["steps"] for p in s["train"]} == {2, 3, 4}
    train_fams, train_tpl = {p["family"] for p in s["train"]}, {p["template"] for p in s["train"]}
    assert train_fams == set(families.TASK_FAMILIES)
    assert {p["family"] for p in s["ood_novel"]} == set(families.NOVEL_FAMILIES) and not train_fams & set(families.NOVEL_FAMILIES)
    assert not train_tpl & {p["template"] for p in s["ood_novel"]}
    table = re.compile(r"^[^|\n]+( \| [^|\n]+)+$", re.M)
    assert all(len(table.findall(p["question"])) >= 2 for p in s["ood_table"])    # a header and a row at least
    assert not any("|" in p["question"] for name in ("train", "test_id") for p in s[name])
    assert {p["template"] for p in s["ood_table"]} <= {f"{f}/table" for f in families.TABLE_FAMILIES}
    sym = s["ood_symbolic"]
    assert {p["template"] for p in sym} <= train_tpl
    train_ents = {e for p in s["train"] for e in p["entities"]}
    assert all(p["entities"] and not set(p["entities"]) & train_ents for p in sym)
    pool0 = {n.split(":")[0] for n in families.NAMES[0]}
    assert all(not any(re.search(rf"\b{n}\b", p["question"]) for n in pool0) for p in sym)


def _check_solution(p):
    anns = data.annotations(p["solution"])
    assert anns, p["id"]
    for expr, stated in anns:
        assert data.safe_eval(expr) == pytest.approx(float(stated)), (p["id"], expr)
        assert float(stated) >= 0 and float(stated) == int(float(stated))
    assert p["intermediates"] == [stated for _, stated in anns]
    assert p["answer"] == p["intermediates"][-1] and p["solution"].endswith(f"The answer is {p['answer']}.")
    values = world_py.program_values(p["program"])
    assert [str(values[st[0]]) for st in p["program"]["steps"]] == p["intermediates"]
    used = {x for st in p["program"]["steps"] for x in st[1:4:2]}
    assert {g[0] for g in p["program"]["givens"]} <= used                       # no unused given
    qv = data.question_values(p["question"])
    assert all(any(confidence.same_value(g[1], q) for q in qv) for g in p["program"]["givens"])  # all in the question


def test_annotations_evaluate_and_match_intermediates(world):
    for name, rows in world["splits"].items():
        for p in rows:
            _check_solution(p)
            assert p["steps"] == len(p["intermediates"])
    for p in world["pretrain_test"]:
        _check_solution(p)


def test_sft_pairs(world):
    train = {p["id"]: p for p in world["splits"]["train"]}
    assert [r["id"] for r in world["cot"]] == [r["id"] for r in world["comt"]] == list(train)
    for cot, comt in zip(world["cot"], world["comt"]):
        p = train[cot["id"]]
        assert cot["prompt"] == comt["prompt"] == f"Question: {p['question']}\n"
        assert "<<" not in cot["completion"] and data.extract_answer(cot["completion"]) == p["answer"]
        assert "eos" not in cot and comt["eos"] is False
        m = comt["completion"]
        assert m.startswith("Plan:\nLet ") and m.endswith(f"The answer is {p['program']['steps'][-1][0]}.\nExecution:\n")
        assert not re.search(r"\d", m)                                          # not even a question number
        assert data.check_meta_thought(m, p["question"]) == m
        text = p["question"] + "\n" + m + world_py.program_execution(p["program"])  # what the student writes after
        assert data.extract_answer(text) == p["answer"]
    s = world["summary"]
    assert s["tokenizer"] is None and set(s["cot"]) == {"chars", "words"} and s["comt"]["chars"] > 0



# ----------------------------------------------------------------------------- the base corpus

def test_base_corpus(world):
    assert not set(world_py.BASE_FAMILIES) & (set(families.TASK_FAMILIES) | set(families.NOVEL_FAMILIES))
    assert {p["family"] for p in world["pretrain_test"]} == set(world_py.BASE_FAMILIES)
    texts = world["pretrain"]
    assert len(texts) == 600
    kinds = {k: [t for t in texts if t.startswith(pre)] for k, pre in
             [("plan", "Question:"), ("binding", "Given:"), ("story", "Story:")]}
    plan = [t for t in kinds["plan"] if "\nPlan:\n" in t]
    cot = [t for t in kinds["plan"] if "\nPlan:\n" not in t]
    drills = [t for t in texts if re.fullmatch(r"(\d+ [-+*/] \d+ = \d+\n?)+", t)]
    assert plan and cot and drills and kinds["binding"] and kinds["story"]
    assert len(plan) + len(cot) + len(drills) + len(kinds["binding"]) + len(kinds["story"]) == len(texts)
    task_q = {p["question"] for rows in world["splits"].values() for p in rows}
    held = {p["question"] for p in world["pretrain_test"]}
    for t in kinds["plan"] + kinds["story"]:
        q = t.split("\n")[0].removeprefix("Question: ").removeprefix("Story: ")
        assert q not in task_q and q not in held
    # stories carry the task families' words (the base must know them), never a solution or an answer
    task_words = {w for rows in world["splits"].values() for p in rows for w in re.findall(r"[a-z]+", p["question"])}
    corpus_words = {w for t in texts for w in re.findall(r"[a-z]+", t)}
    assert len(task_words & corpus_words) > 0.8 * len(task_words)                          # 600 docs here
    assert not any("Plan:" in t or "The answer is" in t for t in kinds["story"])
    n_lines = 0
    for t in plan + kinds["binding"] + drills:                                  # every written computation is right
        for line in t.splitlines():
            m = re.fullmatch(r"(?:\w+ = \w+ [-+*/] \w+ = )?(\d+ [-+*/] \d+) = (\d+)", line)
            if m:
                assert data.safe_eval(m.group(1)) == int(m.group(2)), line
                n_lines += 1
        assert t.endswith(".") or t in drills
        if t not in drills:
            assert data.extract_answer(t) is not None and re.search(r"\nExecution:\n\w+ = \d+\n", t)
    assert n_lines > 1000
    biggest = max(v for t in texts for _, _, v in confidence.number_spans(t, fractions=True))
    hard = max(float(x) for p in world["splits"]["ood_hard"] for x in p["intermediates"])
    assert biggest >= hard                                                     # the OOD magnitudes are not new
    assert data.load_problems(world["out"] / "pretrain_test.jsonl")[0]["id"] == "pretrain_test-00000"


def _let_defs(lines):
    """(name, description) for each "Let name be description." line of a plan, in order."""
    return [tuple(ln[len("Let "):-1].split(" be ", 1)) for ln in lines if ln.startswith("Let ")]


def test_exercise_docs_only_the_plan_determines_the_computation():
    cfg = world_py.WorldConfig(n_pretrain=400)
    texts, counts = world_py.pretrain_corpus(cfg)
    assert counts["exercise"] > 0.3 * len(texts) and set(counts) == {"plan", "exercise", "cot", "binding", "drill",
                                                                       "story"}
    rng, names = random.Random(5), list(world_py.BINDING_WORDS)
    plans, renamed, checked = set(), 0, 0
    for i in range(60):
        fam = sorted(families.TASK_FAMILIES)[i % len(families.TASK_FAMILIES)]
        q, g, _ = families.sample(families.TASK_FAMILIES[fam], rng, limit=cfg.max_value)
        prog = g.program()
        doc = world_py.exercise_doc(rng, cfg, q, prog, names)
        if doc is None:
            continue
        lines = doc.splitlines()
        assert lines[0] == f"Question: {q}" and lines[1] == "Plan:" and doc.count("Execution:") == 1
        defs = _let_defs(lines)
        let = [n for n, _ in defs]
        assert len(let) == len(prog["givens"])
        exe = lines[lines.index("Execution:") + 1:]
        by_desc = {d: v for _, v, d in prog["givens"]}
        for (name, desc), bound in zip(defs, exe):      # each quantity bound to its name, with the story's value
            assert bound == f"{name} = {by_desc[desc]}", (name, desc, bound)
        renamed += not set(let) & {v for v, _, _ in prog["givens"]}
        steps = [ln for ln in lines[2 + len(defs):lines.index("Execution:")] if " = " in ln]
        plans.add(tuple(ln.split(" = ")[1] for ln in steps))
        env = {n: int(b.split(" = ")[1]) for n, b in zip(let, exe)}
        for st, ex in zip(steps, exe[len(let):]):        # the execution follows the written plan, step by step
            var, formula = st.rstrip(".").split(" = ")
            assert ex.startswith(f"{var} = {formula} = ")
            env[var] = int(data.safe_eval(formula, env))
            assert ex.endswith(f"= {env[var]}")
        assert data.extract_answer(doc) == str(env[var])
        checked += 1
    assert checked > 50 and 10 < renamed < 50 and len(plans) > 40   # random plans, half of them renamed


def test_cli_build(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                                                # no base/ tokenizer here
    assert data.main(["--out", str(tmp_path / "d"), "--n-train", "50", "--n-test", "10", "--n-ood", "10",
                      "--n-pretrain", "50", "--n-pretrain-test", "10"]) == 0  # no subcommand: build
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'd'}/ in ") and out.count("\n") == 12
    assert "world/ood_symbolic.jsonl  10 problems" in out and "characters / whitespace words" in out
    assert len(read(tmp_path / "d/comt.jsonl")) == 50


def test_world_cli(tmp_path):
    """The scripts: python world.py is python data.py build; bad input is one line on stderr and exit status 2."""
    r = subprocess.run([sys.executable, str(ROOT / "world.py"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "usage: world.py build" in r.stdout and "--n-pretrain-test" in r.stdout
    for script in ("world.py", "data.py"):   # the error raised in world.py reaches data.py's main() as a DataError
        r = subprocess.run([sys.executable, str(ROOT / script), "--out", str(tmp_path / "w"), "--hard-min", "0"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (script, r.stderr)
        assert r.stderr == "error: --hard-min 0 --hard-max 1000: expected 1 <= hard_min <= hard_max\n"
    assert not (tmp_path / "w").exists()
