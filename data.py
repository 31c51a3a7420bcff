"""data.py: problems, teachers and SFT sets for CoMT (stage 1 of arXiv 2601.21909).

Stage 1 of the paper is a data transformation: a teacher rewrites each solution as a *meta-thought*,
the strategy in words with every quantity a named variable and no computed number. This file makes
the problems (an embedded synthetic world, or real benchmarks converted), runs the teachers, and
writes the SFT sets.

Run
    python data.py                      # the embedded default under data/ (seconds, one core)
    python data.py teach --teacher rule --problems gsm8k/train.jsonl --out comt.jsonl
    python data.py teach --teacher openai --teacher-url http://host:8000/v1 --teacher-model M \\
        --problems train.jsonl --out comt.jsonl          # key from $OPENAI_API_KEY; resumable
    python data.py convert --format gsm8k --in gsm8k/test.jsonl --out gsm8k_test.jsonl

Problems (.jsonl, one object a line): id, question, answer (a number, as a string), intermediates
(gold value of every step, strings), solution (worked solution with GSM8K annotations
`5 * 3 = <<5*3=15>>15`), source. World problems add family, template, steps, entities and program
(the computation graph: givens [var, value, description], steps [var, a, op, b, description]).
load_problems also reads GSM8K's own lines ({"question", "answer": "... #### 72"}) as they are.

Texts (the tokenizer renders BOS + prompt + completion [+ EOS]; digits are single tokens):
  prompt     "Question: {question}\n"
  CoT        a sentence per step with its numbers, then the answer line:
             "The number of bags is 5 and the number of apples in each bag is 3, so the number of
             apples in all the bags is 5 * 3 = 15.\n...\nThe answer is 15."
  CoMT       the meta-thought: what each given is, then the strategy as formulas over the names,
             no number at all (the programmatic teacher writes not even the question's numbers):
             "Plan:\nLet bags be the number of bags and per_bag the number of apples in each bag.\n
             apples = bags * per_bag.\n...\nThe answer is apples.\nExecution:\n"
             written as {"prompt", "completion", "eos": false}: the completion is a prefix the
             student continues, so the SFT loss covers exactly the meta-thought and no EOS.
  Execution  what follows "Execution:\n", in the base corpus and in the student's answers:
             "bags = 5\nper_bag = 3\napples = bags * per_bag = 5 * 3 = 15\nThe answer is 15."
Our interpretation (the paper is silent): SFT supervises the meta-thought; execution is a base skill,
taught by the base corpus and adapted by RL. Every answer ends with exactly "The answer is N.".

The embedded world (python data.py; everything a function of --seed):
  data/world/train, test_id   14 task families (shopping, sharing, rates, percentages, discounts, ages,
                              recipes, wages, savings, garden, bus, packing, schedules, collections),
                              3-4 phrasings each, 2-4 steps, random names, objects and numbers
  data/world/ood_hard         the same, amounts (prices, sizes, distances) x 100-1000 (GSM-Hard)
  data/world/ood_deep         5 of the families with 5-8 steps
  data/world/ood_novel        4 families and phrasings never seen in train (AsDiv / MAWPS)
  data/world/ood_table        4 of the families with their facts in a table (TabMWP)
  data/world/ood_symbolic     train templates, renamed entities (a disjoint pool), new numbers (GSM-Symbolic)
  data/pretrain.jsonl         the base corpus, {"text"}: Question/Plan/Execution and Question/CoT documents
                              of 6 base families DISJOINT from the task families, binding exercises
                              ("Given: ...", a plan of formulas, its execution), arithmetic drills, stories
  data/pretrain_test.jsonl    held-out base-family problems, to measure the base skills
  data/cot.jsonl, comt.jsonl  the programmatic teacher's SFT pairs for train
Number ranges (a few-million-parameter model learns the format long before the arithmetic): ID counts
mostly 2-12 and amounts 1-150, every number of a question and of its steps <= 999 (--max-value);
ood_hard up to 999,000. The base corpus puts 30% (--base-big) of its problems and drill lines at ood_hard
magnitudes (drill operands up to 6 digits), so ood_hard tests the task, not unseen digits.

Teachers (python data.py teach): programmatic (world problems' graphs), rule (abstraction of any
annotated solution, e.g. GSM8K train, offline), openai (any OpenAI-compatible server; concurrent,
retried, resumable, validated), local (a checkpoint through model.py). Rejections, with the reason,
go to <out>.rejected.jsonl. Benchmarks (python data.py convert): gsm8k, svamp, asdiv (jsonl or xml),
mawps, tabmwp, gsm_hard, gsm_symbolic, with gold intermediates where the source has them.

Computed number (validator): a number in a meta-thought whose value is not among the question's
values. Numbers are digit strings: integers, decimals, thousands separators, negatives, simple
fractions (3/4); digits inside identifiers do not count; "Step 2" and list markers "2." / "2)" at a
line start (up to 20) are labels, not numbers. The question's values are its numbers (a fraction also
gives its two parts), its number words ("three", "half" = 2 and 0.5) and 100 if it has a percentage.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class WorldConfig:
    out: str = "data"              # output directory of the embedded default
    seed: int = 0                  # every file is a pure function of this seed and the sizes
    n_train: int = 6000            # training problems (cot.jsonl / comt.jsonl are made from these)
    n_test: int = 500              # in-distribution test problems
    n_ood: int = 500               # problems in each OOD split
    n_pretrain: int = 10000        # base-corpus documents (about 4 MB at this size)
    n_pretrain_test: int = 500     # held-out base-family problems, to measure base skills
    max_value: int = 999           # largest number in an ID problem (question and every step)
    hard_min: int = 100            # ood_hard multiplies the amounts by a factor in [hard_min, hard_max]
    hard_max: int = 1000
    base_big: float = 0.3          # share of base-corpus problems and drills at ood_hard magnitudes
    tokenizer: str = ""            # tokenizer dir for token counts ("" = base/ when it exists)


@dataclass
class TeacherConfig:
    teacher: str = "programmatic"  # programmatic | rule | openai | local
    kind: str = "comt"             # comt (meta-thought) | cot (worked solution with numbers)
    problems: str = ""             # problems .jsonl (ours, or GSM8K's own lines)
    out: str = ""                  # output .jsonl; rejections go to <out>.rejected.jsonl
    limit: int = 0                 # only the first N problems (0 = all)
    teacher_url: str = "http://127.0.0.1:8000/v1"  # OpenAI-compatible base URL (or .../chat/completions)
    teacher_model: str = "meta-llama/Llama-3.1-70B-Instruct"  # the paper's teacher
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (unset: no header)
    workers: int = 8               # concurrent requests
    timeout: float = 60.0          # seconds per request
    retries: int = 4               # extra attempts after a failed request (timeouts, 5xx, garbage)
    backoff: float = 1.0           # seconds before the first retry, doubled each time
    max_tokens: int = 512          # teacher answer budget
    temperature: float = 0.0       # teacher sampling temperature
    ckpt: str = ""                 # local teacher: checkpoint directory (model.py + tokenizer.py)
    batch_size: int = 16           # local teacher: prompts per generate() call
    local_prompt: str = "instruction"  # local teacher: "instruction" (the paper's) | "plain" ("Question: q\n")


# The paper's teacher instruction (CoMT), quoted; the CoT one is ours, for the CoT-SFT baseline.
COMT_INSTRUCTION = ("Solve this problem by describing the REASONING STEPS in natural language using "
                    "only variable names. Do NOT calculate any specific numbers.")
COT_INSTRUCTION = ("Solve this problem step by step, writing out every calculation with its numbers. "
                   "End with a line of the form 'The answer is N.'")
SPLITS = ("train", "test_id", "ood_hard", "ood_deep", "ood_novel", "ood_table", "ood_symbolic")


class DataError(ValueError):
    """Bad input: the message is one line naming the file, the line and what was expected."""


# ---------------------------------------------------------------------------------------------
# Numbers and answers
# ---------------------------------------------------------------------------------------------
# A number: optional minus (not after a word or ")", so "10-2" has no negative), digits with or
# without thousands separators, an optional decimal part, an optional "/denominator" (simple
# fraction); or a bare ".5". Not inside identifiers ("step2", "x_1").
_NUM = re.compile(r"(?<![\w.])(?:(?<![\w)])-(?=[\d.]))?"
                  r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?![\d.]))?|\.\d+)")


def _num_value(s: str) -> float | None:
    s = s.replace(",", "")
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b) if float(b) else None
        return float(s)
    except ValueError:
        return None


def number_spans(text: str) -> list[tuple[int, int, float]]:
    """Every number in text as (start, end, value)."""
    out = []
    for m in _NUM.finditer(text):
        v = _num_value(m.group())
        if v is not None:
            out.append((m.start(), m.end(), v))
    return out


def parse_number(s) -> float | None:
    """One number written alone: '1,234', '-5', '3.5', '.5', '3/4', '1 1/2', '$5', '50%'."""
    if isinstance(s, (int, float)):
        return None if isinstance(s, bool) or not math.isfinite(s) else float(s)
    s = str(s).strip().rstrip(".").strip().lstrip("$").rstrip("%").strip()
    m = re.fullmatch(r"(-?\d+) (\d+)/(\d+)", s)             # mixed number
    if m and int(m.group(3)):
        whole = int(m.group(1))
        return whole + math.copysign(int(m.group(2)) / int(m.group(3)), whole or 1)
    m = _NUM.fullmatch(s)
    return _num_value(s) if m else None


def format_number(v: float) -> str:
    """Canonical answer string: integers without '.0', others to 12 significant digits."""
    if abs(v - round(v)) < 1e-9 * max(1.0, abs(v)):
        return str(int(round(v)))
    s = f"{v:.12g}"
    if "e" in s:   # no exponent notation: '2.0107e-06' -> '0.0000020107'
        s = f"{v:.{max(0, 11 - math.floor(math.log10(abs(v))))}f}".rstrip("0").rstrip(".")
    return s


def normalize_answer(s) -> str | None:
    """A benchmark answer as a canonical number string, units and separators removed; None if the
    answer is not a number ('9 (apples)' -> '9', '$1,200.50' -> '1200.5', '3/4' -> '0.75')."""
    v = parse_number(s)
    if v is None:
        m = re.match(r"\s*\$?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)\s*(%|\([^()]*\)|[A-Za-z][\w ./-]*)?\s*$",
                     str(s))
        v = _num_value(m.group(1)) if m else None
    return None if v is None else format_number(v)


def extract_answer(response_text: str) -> str | None:
    """The N of the last 'The answer is N.' line; None when there is none."""
    found = re.findall(r"The answer is\s*(.*?)\s*$", response_text or "", flags=re.M)
    if not found:
        return None
    ans = found[-1].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def answers_match(pred, gold) -> bool:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None or g is None:
        return False
    p, g = float(p), float(g)
    return abs(p - g) <= 1e-6 * max(1.0, abs(g))


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
        ast.Pow: lambda a, b: a ** b if abs(b) <= 12 else _bad()}


def _bad():
    raise ValueError("unsupported expression")


def safe_eval(expr, names: dict | None = None, steps: list | None = None) -> float:
    """Evaluate + - * / // % ** (small powers) over numbers and known names with ast, never eval().
    If steps is a list, the value of every operation is appended to it (post-order)."""
    node = ast.parse(expr.strip(), mode="eval").body if isinstance(expr, str) else expr
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and names is not None and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = safe_eval(node.operand, names, steps)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = safe_eval(node.left, names, steps), safe_eval(node.right, names, steps)
        try:
            v = _OPS[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError) as e:
            raise ValueError(str(e)) from None
        if steps is not None:
            steps.append(v)
        return v
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


_ANN = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def annotations(solution: str) -> list[tuple[str, str]]:
    """The (expression, stated value) of every <<expr=value>> annotation."""
    return [(m.group(1), m.group(2)) for m in _ANN.finditer(solution or "")]


def strip_annotations(solution: str) -> str:
    return re.sub(r"<<[^<>]*>>", "", solution)


# ---------------------------------------------------------------------------------------------
# Computation graphs and their texts
# ---------------------------------------------------------------------------------------------
class _Resample(Exception):
    """The sampled numbers break a rule (inexact division, negative, too large): draw again."""


class Graph:
    """Givens and steps of one problem: givens in [0, limit], every step's value an integer in
    [1, limit] (exact divisions, no negative or zero result); a broken rule means draw again."""

    def __init__(self, limit: int):
        self.limit, self.givens, self.steps, self.v = limit, [], [], {}

    def given(self, var, value, desc):
        if value < 0 or value > self.limit:
            raise _Resample
        assert var not in self.v, var
        self.givens.append([var, value, desc])
        self.v[var] = value
        return var

    def step(self, var, a, op, b, desc):
        x, y = self.v[a], self.v[b]
        if op == "/" and (y == 0 or x % y):
            raise _Resample
        r = _apply(op, x, y)
        if r <= 0 or r > self.limit:
            raise _Resample
        assert var not in self.v, var
        self.steps.append([var, a, op, b, desc])
        self.v[var] = r
        return var

    def program(self):
        return {"givens": [list(g) for g in self.givens], "steps": [list(s) for s in self.steps]}


def _apply(op, x, y):
    return {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]


def program_values(program) -> dict:
    """Every variable's value: the givens, then each step in order."""
    v = {g[0]: g[1] for g in program["givens"]}
    for var, a, op, b, _ in program["steps"]:
        v[var] = _apply(op, v[a], v[b])
    return v


def _cap(s):
    return s[:1].upper() + s[1:]


def _and(xs):
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def program_solution(program, annotate=True) -> str:
    """The worked solution: a sentence per step with its numbers (GSM8K annotations if annotate)."""
    v, desc = program_values(program), {g[0]: g[2] for g in program["givens"]}
    told, lines = set(), []
    for var, a, op, b, d in program["steps"]:
        intro = [f"{desc[x]} is {v[x]}" for x in dict.fromkeys((a, b)) if x in desc and x not in told]
        told.update((a, b))
        lead = _cap(" and ".join(intro)) + ", so " + d if intro else _cap(d)
        calc = f"{v[a]} {op} {v[b]}"
        ann = f"<<{v[a]}{op}{v[b]}={v[var]}>>" if annotate else ""
        lines.append(f"{lead} is {calc} = {ann}{v[var]}.")
    return "\n".join(lines + [f"The answer is {v[program['steps'][-1][0]]}."])


def program_plan(program) -> str:
    """The meta-thought: what each given is, then the strategy as formulas over names; no number.
    Ends with the hand-off after which the student executes."""
    defs = [f"{var} be {d}" if i == 0 else f"{var} {d}" for i, (var, _, d) in enumerate(program["givens"])]
    lines = ["Plan:", f"Let {_and(defs)}."] + [f"{var} = {a} {op} {b}." for var, a, op, b, _ in program["steps"]]
    return "\n".join(lines + [f"The answer is {program['steps'][-1][0]}.", "Execution:", ""])


def program_execution(program) -> str:
    """What follows 'Execution:': bind each variable, then one line per step with the numbers."""
    v = program_values(program)
    lines = [f"{var} = {val}" for var, val, _ in program["givens"]]
    lines += [f"{var} = {a} {op} {b} = {v[a]} {op} {v[b]} = {v[var]}" for var, a, op, b, _ in program["steps"]]
    return "\n".join(lines + [f"The answer is {v[program['steps'][-1][0]]}."])


# ---------------------------------------------------------------------------------------------
# The embedded world: entities and families
# ---------------------------------------------------------------------------------------------
# Two disjoint pools: pool 0 for train, test_id and most OOD splits; pool 1 only for ood_symbolic
# (GSM-Symbolic: the same templates with renamed entities and resampled numbers). The base corpus
# uses both, as pretraining would: only the task is new to the student, not the words.
NAMES = (
    "Tom:he Anna:she Ben:he Maria:she Sam:he Lucy:she Omar:he Nina:she Leo:he Emma:she Jack:he "
    "Sofia:she Ravi:he Mia:she Carlos:he Zoe:she Ali:he Hana:she Max:he Ella:she Noah:he Chloe:she "
    "Ivan:he Grace:she Kofi:he Lily:she Marco:he Ava:she Paul:he Sara:she Dan:he Rosa:she".split(),
    "Alaric:he Beatrix:she Casimir:he Dagny:she Evander:he Fenella:she Gideon:he Honora:she "
    "Ignatius:he Juniper:she Lysander:he Marisol:she Mordecai:he Nerissa:she Octavian:he "
    "Philippa:she Quentin:he Rosalind:she Sebastian:he Theodora:she Ulysses:he Valentina:she".split(),
)
THINGS = {  # kind -> (pool 0, pool 1), entries "singular/plural" separated by ";"
    "item": ("pen/pens;notebook/notebooks;eraser/erasers;ruler/rulers;marker/markers;folder/folders;"
             "glue stick/glue sticks", "compass/compasses;sketchbook/sketchbooks;highlighter/highlighters;"
             "crayon box/crayon boxes;protractor/protractors;index card/index cards"),
    "food": ("apple/apples;cookie/cookies;candy/candies;orange/oranges;muffin/muffins;cherry/cherries",
             "plum/plums;pretzel/pretzels;apricot/apricots;dumpling/dumplings;lychee/lychees"),
    "bake": ("cookies;cakes;pancakes;muffins;bread rolls", "scones;waffles;brownies;bagels"),
    "ingredient": ("flour;sugar;milk;butter;oats;rice", "cocoa;honey;cornmeal;almonds;buttermilk"),
    "collect": ("shell/shells;sticker/stickers;card/cards;bead/beads", "acorn/acorns;pebble/pebbles;feather/feathers"),
    "crop": ("tomato/tomatoes;pepper/peppers;bean/beans", "pumpkin/pumpkins;melon/melons;radish/radishes"),
    "goods": ("jacket/jackets;lamp/lamps;chair/chairs;backpack/backpacks;bike/bikes",
              "kettle/kettles;rug/rugs;vase/vases;telescope/telescopes"),
    "pack": ("egg/eggs;bottle/bottles;soap/soaps", "jar/jars;candle/candles"),
    "show": ("episode/episodes;movie/movies;lesson/lessons", "documentary/documentaries;lecture/lectures"),
}
ORD = "first second third fourth fifth sixth seventh".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday".split()


def _var(s):
    return re.sub(r"\W+", "_", s.strip().lower()).strip("_")


def _a(noun):
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _table(header, rows):
    return "\n".join([" | ".join(header)] + [" | ".join(str(x) for x in r) for r in rows])


class Person:
    def __init__(self, name, he):
        self.name, self.he, self.He = name, he, _cap(he)
        self.his, self.him = ("his", "him") if he == "he" else ("her", "her")


class Ctx:
    """What a family draws from: counts, amounts (scaled by 100-1000 in ood_hard), entities, a phrasing."""

    def __init__(self, rng, pool=0, scale=1, deep=False, table=False, limit=999, names=None, things=None):
        self.rng, self.scale, self.deep, self.table, self.limit = rng, scale, deep, table, limit * scale
        self.names = names or NAMES[pool]
        self.things = things or {k: v[pool].split(";") for k, v in THINGS.items()}
        self.template, self.entities = 0, []

    def count(self, lo, hi):      # how many of something: never scaled
        return self.rng.randint(lo, hi)

    def amount(self, lo, hi):     # prices, sizes, distances: scaled in ood_hard
        return self.rng.randint(lo * self.scale, hi * self.scale)

    def person(self):
        while True:
            name, he = self.rng.choice(self.names).split(":")
            if name not in self.entities:
                self.entities.append(name)
                return Person(name, he)

    def thing(self, kind):        # (singular, plural)
        while True:
            t = self.rng.choice(self.things[kind])
            if t not in self.entities:
                self.entities.append(t)
                return tuple(t.split("/")) if "/" in t else (t, t)

    def phrasing(self, n, first=0):
        self.template = self.rng.randrange(first, n)
        return self.template


def _sum(g, xs, name, desc):
    """Chain of additions; partial sums are name_a, name_b, ... and the last one is name."""
    total = xs[0]
    for i, x in enumerate(xs[1:]):
        last = i == len(xs) - 2
        total = g.step(name if last else f"{name}_{'abcdef'[i]}", total, "+", x, desc if last else desc + " so far")
    return total


# Task families: each draws from c, builds the graph g, returns the question. Train problems have 2-4
# steps. Families in DEEP grow to 5-8 steps when c.deep (ood_deep); those in TABLE state their facts as
# a table when c.table (ood_table). Every number of the computation appears in the question as digits.
def fam_shopping(c, g):
    p = c.person()
    items = [c.thing("item") for _ in range(c.count(3, 4) if c.deep else c.count(1, 2))]
    costs = []
    for s, pl in items:
        g.given(_var(pl), c.count(2, 9), f"the number of {pl}")
        g.given(_var(s) + "_price", c.amount(2, 25), f"the price of one {s}")
        costs.append(g.step(_var(pl) + "_cost", _var(pl), "*", _var(s) + "_price", f"the cost of the {pl}"))
    total = _sum(g, costs, "total", "the total cost")
    t = g.v[total]
    g.given("paid", (t // 10 + 1 + c.count(0, 3)) * 10 if c.scale == 1 else t + c.amount(1, 40),
            f"the money {p.name} pays with")
    g.step("change", "paid", "-", total, "the change")
    v = g.v
    buys = _and([f"{v[_var(pl)]} {pl}" for s, pl in items])
    each = _and([f"{v[_var(pl)]} {pl} for {v[_var(s) + '_price']} dollars each" for s, pl in items])
    costs = _and([f"{_a(s)} costs {v[_var(s) + '_price']} dollars" for s, pl in items])
    if c.table:
        t = _table(["Item", "Price (dollars)"], [[s, v[_var(s) + "_price"]] for s, pl in items])
        return (f"The table shows the prices at a school shop.\n{t}\n{p.name} buys {buys} and pays with "
                f"{v['paid']} dollars. How much change does {p.he} get?")
    return [f"{p.name} buys {each}. {p.He} pays with {v['paid']} dollars. How much change does {p.he} get?",
            f"At the shop, {costs}. {p.name} buys {buys} and hands the cashier {v['paid']} dollars. "
            f"How many dollars should {p.name} get back?",
            f"{p.name} has {v['paid']} dollars. {p.He} buys {each}. How many dollars does {p.he} have left?",
            ][c.phrasing(3)]


def fam_sharing(c, g):
    p, (s, pl) = c.person(), c.thing("food")
    i = c.phrasing(3)
    who, whom = [("friend", "friends"), ("bag", "bags"), ("child", "children")][i]
    g.given("boxes", c.count(2, 9), "the number of boxes")
    g.given("per_box", c.amount(3, 15), f"the number of {pl} in each box")
    g.step(_var(pl), "boxes", "*", "per_box", f"the number of {pl} in all the boxes")
    g.given("gone", c.amount(1, 20), f"the number of {pl} taken out")
    g.step("rest", _var(pl), "-", "gone", f"the number of {pl} left")
    g.given(whom, c.count(2, 6), f"the number of {whom}")
    g.step("each", "rest", "/", whom, f"the number of {pl} for each {who}")
    b, n, k, x = g.v["boxes"], g.v["per_box"], g.v[whom], g.v["gone"]
    return [f"{p.name} has {b} boxes of {pl} with {n} {pl} in each box. {p.He} gives {x} {pl} to {p.his} "
            f"teacher and shares the rest equally among {k} friends. How many {pl} does each friend get?",
            f"There are {n} {pl} in each of {b} boxes. After {p.name} eats {x} of them, {p.he} splits the "
            f"remaining {pl} equally into {k} bags. How many {pl} go in each bag?",
            f"{p.name} packed {b} boxes, each holding {n} {pl}. {x} {pl} were lost on the way. The remaining "
            f"{pl} are shared equally by {k} children. How many {pl} does each child get?"][i]


def fam_journey(c, g):
    p, k = c.person(), c.count(3, 4) if c.deep else c.count(1, 2)
    legs = []
    for j, L in enumerate("abcd"[:k]):
        g.given(f"speed_{L}", c.amount(20, 70), f"the speed on the {ORD[j]} part in km per hour")
        g.given(f"hours_{L}", c.count(2, 5), f"the number of hours on the {ORD[j]} part")
        legs.append(g.step(f"distance_{L}", f"speed_{L}", "*", f"hours_{L}", f"the distance of the {ORD[j]} part"))
    done = _sum(g, legs, "driven", "the distance covered")
    g.given("route", g.v[done] + c.amount(5, 80), "the length of the whole trip in km")
    g.step("remaining", "route", "-", done, "the distance still to go")
    v = g.v
    sp = [(v[f"speed_{L}"], v[f"hours_{L}"]) for L in "abcd"[:k]]
    if c.table:
        t = _table(["Part", "Speed (km per hour)", "Hours"], [[ORD[j], s, h] for j, (s, h) in enumerate(sp)])
        return (f"{p.name} drives a trip in parts, as the table shows.\n{t}\nThe whole trip is {v['route']} km "
                f"long. How many km does {p.he} still have to drive?")
    a = ", then ".join(f"at {s} km per hour for {h} hours" for s, h in sp)
    b = ", then ".join(f"for {h} hours at {s} km per hour" for s, h in sp)
    return [f"{p.name} drives {a}. The whole trip is {v['route']} km long. How many km does {p.he} still have to "
            f"drive?",
            f"A train travels {b}. Its route is {v['route']} km long. How many km of the route are left?",
            f"{p.name} is cycling a {v['route']} km route. {p.He} rides {a}. How many km of the route has {p.he} "
            f"not ridden yet?"][c.phrasing(3)]


def fam_percent(c, g):
    p, i = c.person(), c.phrasing(3)
    whole, part, rest = [("members", "children", "adults"), ("students", "riders", "walkers"),
                         ("animals", "sheep", "goats")][i]
    g.given(whole, 100 * c.amount(2, 9), f"the number of {whole}")
    g.given("group", 100, f"the size of each group of {whole}")
    g.given(part + "_per_group", c.rng.choice([10, 20, 25, 30, 40, 50, 60, 75]), f"the number of {part} in each group")
    g.step("groups", whole, "/", "group", "the number of groups")
    g.step(part, "groups", "*", part + "_per_group", f"the number of {part}")
    g.step(rest, whole, "-", part, f"the number of {rest}")
    if i == 2:
        g.given("hay_each", c.count(2, 5), "the kg of hay one goat eats a day")
        g.step("hay", "goats", "*", "hay_each", "the kg of hay the goats eat a day")
    n, k = g.v[whole], g.v[part + "_per_group"]
    return [f"A club has {n} members. Out of every 100 members, {k} are children. How many members are adults?",
            f"{p.name}'s school has {n} students. For every 100 students, {k} ride the bus and the others walk. "
            f"How many students walk?",
            f"A farm has {n} animals. {k} out of every 100 animals are sheep and the rest are goats. Each goat eats "
            f"{g.v.get('hay_each')} kg of hay a day. How many kg of hay do the goats eat each day?"][i]


def fam_discount(c, g):
    p, (s, pl) = c.person(), c.thing("goods")
    bill = 100 * c.amount(1, 9)
    n = c.rng.choice([d for d in range(2, 10) if bill % d == 0])
    g.given(_var(pl), n, f"the number of {pl} bought")
    g.given("price", bill // n, f"the price of one {s}")
    g.given("group", 100, "the size of one block of the bill in dollars")
    g.given("off", c.rng.choice([5, 10, 15, 20, 25, 30, 40, 50]), "the discount on each block in dollars")
    g.step("cost", _var(pl), "*", "price", f"the cost of the {pl}")
    g.step("blocks", "cost", "/", "group", "the number of blocks")
    g.step("discount", "blocks", "*", "off", "the discount")
    g.step("pay", "cost", "-", "discount", "the amount paid")
    v = g.v
    return [f"A {s} costs {v['price']} dollars. {p.name} buys {n} {pl}. The store takes {v['off']} dollars off "
            f"for every 100 dollars spent. How much does {p.name} pay?",
            f"{p.name} orders {n} {pl} at {v['price']} dollars each. A coupon saves {v['off']} dollars for every "
            f"100 dollars of the bill. How many dollars does {p.he} pay in the end?",
            f"{n} {pl} are bought by {p.name} for {v['price']} dollars each. For every 100 dollars spent, {p.he} "
            f"gets {v['off']} dollars back. How much does {p.name} spend after the money back?"][c.phrasing(3)]


def fam_ages(c, g):
    A, B, C = c.person(), c.person(), c.person()
    a, b, cc = (_var(x.name) + "_age" for x in (A, B, C))
    i = c.phrasing(3)
    g.given(a, c.amount(3, 12), f"{A.name}'s age")
    g.given("times", c.count(2, 4), f"the number of times {B.name} is as old as {A.name}")
    g.step(b, a, "*", "times", f"{B.name}'s age")
    g.given("younger", c.amount(1, 9), f"the number of years {C.name} is younger than {B.name}")
    g.step(cc, b, "-", "younger", f"{C.name}'s age")
    if i == 1:
        g.step("two_ages", a, "+", b, f"the sum of the ages of {A.name} and {B.name}")
        g.step("all_ages", "two_ages", "+", cc, "the sum of all three ages")
    else:
        g.given("years", c.count(2, 9), "the number of years")
        g.step("then_age", cc, "+" if i == 0 else "-", "years", f"{C.name}'s age at that time")
    v = g.v
    return [f"{A.name} is {v[a]} years old. {B.name} is {v['times']} times as old as {A.name}. {C.name} is "
            f"{v['younger']} years younger than {B.name}. How old will {C.name} be in {v.get('years')} years?",
            f"{B.name}'s age is {v['times']} times {A.name}'s age, and {A.name} is {v[a]} years old. {C.name} is "
            f"{v['younger']} years younger than {B.name}. What is the sum of the ages of {A.name}, {B.name} and "
            f"{C.name}?",
            f"{A.name} is {v[a]}. {B.name} is {v['times']} times as old as {A.name}, and {C.name} is {v['younger']} "
            f"years younger than {B.name}. How old was {C.name} {v.get('years')} years ago?"][i]


def fam_recipe(c, g):
    p, (bake, _) = c.person(), c.thing("bake")
    k = c.count(3, 4) if c.deep else c.count(1, 2)
    i = c.phrasing(4, first=2 if k == 1 else 0)       # one ingredient alone is a 1-step total: use the bowl
    ings = [c.thing("ingredient")[0] for _ in range(k)]
    g.given("batches", c.count(2, 9), "the number of batches")
    needs = []
    for ing in ings:
        g.given(_var(ing) + "_per_batch", c.amount(2, 12), f"the number of cups of {ing} in one batch")
        needs.append(g.step(_var(ing) + "_cups", _var(ing) + "_per_batch", "*", "batches",
                            f"the number of cups of {ing} needed"))
    cups = _sum(g, needs, "cups", "the number of cups of all ingredients")
    if i >= 2:
        g.given("bowl", g.v[cups] + c.amount(1, 30), "the number of cups the bowl holds")
        g.step("space", "bowl", "-", cups, "the number of empty cups in the bowl")
    v = g.v
    per = _and([f"{v[_var(x) + '_per_batch']} cups of {x}" for x in ings])
    ask = ("How many cups of ingredients does {he} use in all?" if i < 2 else
           f"{p.He} mixes everything in a bowl that holds {v.get('bowl')} cups. How many cups of the bowl are still "
           f"empty?")
    ask = ask.replace("{he}", p.he)
    if c.table:
        t = _table(["Ingredient", "Cups per batch"], [[x, v[_var(x) + "_per_batch"]] for x in ings])
        return f"The table shows a recipe for {bake}.\n{t}\n{p.name} makes {v['batches']} batches. {ask}"
    return [f"One batch of {bake} needs {per}. {p.name} makes {v['batches']} batches. {ask}",
            f"{p.name} bakes {v['batches']} batches of {bake}. Each batch takes {per}. {ask}",
            f"To make {v['batches']} batches of {bake}, {p.name} uses {per} for every batch. {ask}",
            f"A recipe for {bake} calls for {per} per batch, and {p.name} bakes {v['batches']} batches. {ask}"][i]


def fam_wages(c, g):
    p, i = c.person(), c.phrasing(3)
    g.given("wage", c.amount(5, 20), "the pay for one hour in dollars")
    g.given("hours", c.count(2, 6), "the number of hours worked each day")
    g.given("days", c.count(2, 6), "the number of days worked")
    g.step("daily_pay", "wage", "*", "hours", "the pay for one day")
    g.step("earned", "daily_pay", "*", "days", "the pay for all the days")
    spent, left = [("gift", "left"), ("saved", "spent"), ("shoes", "left")][i]
    g.given(spent, c.amount(10, 150), ["the price of the gift", "the money saved", "the price of the shoes"][i])
    g.step(left, "earned", "-", spent, ["the money left", "the money spent", "the money left"][i])
    w, h, d, s = (g.v[x] for x in ("wage", "hours", "days", spent))
    return [f"{p.name} earns {w} dollars an hour. {p.He} works {h} hours a day for {d} days. Then {p.he} buys a gift "
            f"for {s} dollars. How much money does {p.he} have left?",
            f"{p.name} works {d} days at a cafe, {h} hours each day, and is paid {w} dollars per hour. {p.He} puts {s} "
            f"dollars into savings and spends the rest. How many dollars does {p.he} spend?",
            f"For each hour of babysitting, {p.name} gets {w} dollars. {p.He} babysits {h} hours on each of {d} days "
            f"and then buys shoes for {s} dollars. How many dollars are left?"][i]


def fam_savings(c, g):
    p, (s, pl), i = c.person(), c.thing("goods"), c.phrasing(3)
    weeks, w = c.count(2, 12), c.amount(2, 20)
    gift = c.amount(1, 10) if i == 2 else 0
    has = c.amount(5, 100)
    g.given("price", has + weeks * (w + gift), f"the price of the {s}")
    g.given("saved", has, "the money saved so far")
    g.given("weekly", w, "the money saved each week")
    g.step("needed", "price", "-", "saved", "the money still needed")
    per = "weekly"
    if i == 2:
        g.given("aunt", gift, "the money the aunt adds each week")
        per = g.step("per_week", "weekly", "+", "aunt", "the money added each week")
    g.step("weeks", "needed", "/", per, "the number of weeks")
    v = g.v
    return [f"{p.name} wants a {s} that costs {v['price']} dollars. {p.He} has saved {has} dollars and saves {w} "
            f"dollars more every week. How many weeks will it take {p.him} to have enough?",
            f"A {s} costs {v['price']} dollars. {p.name} already has {has} dollars. If {p.he} puts away {w} dollars "
            f"each week, in how many weeks can {p.he} buy it?",
            f"{p.name} is saving for a {s} that costs {v['price']} dollars and has {has} dollars so far. Each week "
            f"{p.he} saves {w} dollars of {p.his} own and {p.his} aunt adds {gift} dollars. How many weeks until "
            f"{p.he} has exactly enough?"][i]


def fam_garden(c, g):
    p, (s, pl), i = c.person(), c.thing("crop"), c.phrasing(3)
    g.given("rows", c.count(2, 9), "the number of rows")
    g.given("per_row", c.amount(3, 12), "the number of plants in each row")
    g.step("plants", "rows", "*", "per_row", "the number of plants")
    g.given("per_plant", c.count(2, 9), f"the number of {pl} on each plant")
    g.step(_var(pl), "plants", "*", "per_plant", f"the number of {pl}")
    if i == 1:
        g.given("bag_size", c.count(2, 9), f"the number of {pl} in each bag")
        g.step("bags", _var(pl), "/", "bag_size", "the number of bags")
    else:
        g.given("lost", c.amount(1, 30), f"the number of {pl} " + ("given away" if i == 0 else "that went bad"))
        g.step("kept", _var(pl), "-", "lost", f"the number of {pl} kept" if i == 0 else f"the number of good {pl}")
    v = g.v
    r, n, f = v["rows"], v["per_row"], v["per_plant"]
    return [f"{p.name} plants {r} rows of {s} plants with {n} plants in each row. Each plant grows {f} {pl}. {p.He} "
            f"gives {v.get('lost')} {pl} to neighbours. How many {pl} does {p.he} keep?",
            f"A garden has {r} rows of {s} plants, {n} plants per row. Every plant gives {f} {pl}. {p.name} packs all "
            f"of them into bags of {v.get('bag_size')}. How many bags does {p.he} fill?",
            f"In {p.name}'s garden there are {n} {s} plants in each of {r} rows, and each plant has {f} {pl}. "
            f"After {v.get('lost')} {pl} go bad, how many good {pl} are there?"][i]


def fam_bus(c, g):
    p, i = c.person(), c.phrasing(3)
    who = ["passengers", "children", "riders"][i]
    stops = c.count(3, 4) if c.deep else c.count(1, 2)
    cur = g.given("start", c.amount(10, 60), f"the number of {who} at the start")
    for j, L in enumerate("abcd"[:stops]):
        g.given(f"off_{L}", c.amount(1, 15), f"the number of {who} getting off at the {ORD[j]} stop")
        g.given(f"on_{L}", c.amount(1, 15), f"the number of {who} getting on at the {ORD[j]} stop")
        cur = g.step(f"after_off_{L}", cur, "-", f"off_{L}",
                     f"the number of {who} after some get off at the {ORD[j]} stop")
        cur = g.step(who if j == stops - 1 else f"after_{L}", cur, "+", f"on_{L}",
                     f"the number of {who} after the {ORD[j]} stop")
    v = g.v
    ons = [(v[f"off_{L}"], v[f"on_{L}"]) for L in "abcd"[:stops]]
    if c.table:
        t = _table(["Stop", "Got off", "Got on"], [[ORD[j], a, b] for j, (a, b) in enumerate(ons)])
        return (f"A bus starts with {v['start']} {who} and makes the stops in the table.\n{t}\n"
                f"How many {who} are on the bus after the last stop?")
    st = " ".join(f"At the {ORD[j]} stop, {a} get off and {b} get on." for j, (a, b) in enumerate(ons))
    return [f"A bus leaves the station with {v['start']} passengers. {st} How many passengers are on the bus now?",
            f"{p.name} drives a school bus. {v['start']} children are on board when {p.he} starts. {st} How many "
            f"children are on the bus after the last stop?",
            f"A tram starts its trip with {v['start']} riders. {st} How many riders are on the tram at the end?"][i]


def fam_packing(c, g):
    p, (s, pl), i = c.person(), c.thing("pack"), c.phrasing(3)
    size = c.count(2, 12)
    g.given(_var(pl), size * c.amount(2, 15), f"the number of {pl}")
    g.given("box_size", size, f"the number of {pl} in each box")
    g.step("boxes", _var(pl), "/", "box_size", "the number of boxes")
    g.given("box_price", c.count(2, 15), "the price of one box")
    g.step("income", "boxes", "*", "box_price", "the money from the boxes")
    g.given("costs", c.amount(5, 60), ["the packing cost", "the stall cost", "the rent"][i])
    g.step("profit", "income", "-", "costs", "the money kept")
    v = g.v
    n, b, pr, k = v[_var(pl)], size, v["box_price"], v["costs"]
    return [f"A farm collects {n} {pl}. They are packed {b} to a box, and each box sells for {pr} dollars. The packing "
            f"costs {k} dollars in total. How much money does the farm keep?",
            f"{p.name} has {n} {pl} and puts them in boxes of {b}. {p.He} sells every box for {pr} dollars and pays "
            f"{k} dollars for the stall. How many dollars does {p.he} keep?",
            f"{n} {pl} are sorted into packs of {b}. Each pack sells for {pr} dollars, and {k} dollars of the money "
            f"goes to rent. How much money is left?"][i]


def fam_schedule(c, g):
    p, (s, pl), i = c.person(), c.thing("show"), c.phrasing(3)
    total = 60 * c.amount(1, 6)
    k = c.rng.choice([d for d in range(2, 9) if total % d == 0])
    brk = c.amount(1, 10)
    if total // k - brk < 5 * c.scale:
        raise _Resample
    g.given(_var(pl), k, f"the number of {pl}")
    g.given("minutes_each", total // k - brk, f"the length of one {s} in minutes")
    g.given("pause", brk, f"the length of the break after each {s}")
    g.step("block", "minutes_each", "+", "pause", f"the length of one {s} with its break")
    g.step("minutes", "block", "*", _var(pl), "the total time in minutes")
    if i < 2:
        g.given("hour", 60, "the number of minutes in an hour")
        g.step("hours", "minutes", "/", "hour", "the total time in hours")
    m, b = g.v["minutes_each"], brk
    return [f"{p.name} watches {k} {pl}. Each one lasts {m} minutes, and {p.he} takes a {b} minute break after each. "
            f"An hour has 60 minutes. How many hours does this take?",
            f"A school day has {k} {pl}, each {m} minutes long, with a {b} minute break after every one. How many "
            f"hours is that, if an hour has 60 minutes?",
            f"{p.name} records {k} {pl} of {m} minutes each and adds {b} minutes of notes after each one. How many "
            f"minutes does {p.he} spend in total?"][i]


def fam_collection(c, g):
    p, (s, pl), i = c.person(), c.thing("collect"), c.phrasing(3)
    verb = ["collects", "finds", "gets"][i]
    days = c.count(4, 5) if c.deep else c.count(2, 3)
    prev = g.given(DAYS[0].lower(), c.amount(3, 20), f"the number of {pl} on {DAYS[0]}")
    said, got = [f"On {DAYS[0]} {p.name} {verb} {g.v[prev]} {pl}."], [prev]
    for d in DAYS[1:days]:
        op = c.rng.choice("*+-")
        rel = {"*": "times", "+": "more", "-": "fewer"}[op]
        x = g.given(f"{rel}_{d.lower()}", c.count(2, 3) if op == "*" else c.amount(1, 9),
                    {"*": f"the multiplier for {d}", "+": f"the number of extra {pl} on {d}",
                     "-": f"the number of {pl} fewer on {d}"}[op])
        prev = g.step(d.lower(), prev, op, x, f"the number of {pl} on {d}")
        said.append(f"On {d} {p.he} {verb} {g.v[x]} times as many as on the day before." if op == "*" else
                    f"On {d} {p.he} {verb} {g.v[x]} {rel} than on the day before.")
        got.append(prev)
    _sum(g, got, "total", f"the number of {pl} on all days")
    ask = [f"How many {pl} does {p.he} collect in all?", f"How many {pl} has {p.he} found altogether?",
           f"What is the total number of {pl} {p.name} gets?"][i]
    return " ".join(said) + " " + ask


# Novel families (ood_novel only, like AsDiv / MAWPS): new stories, new graph shapes, question-first
# and other phrasings the task families never use.
def fam_coins(c, g):
    p, i = c.person(), c.phrasing(2)
    g.given("nickels", c.count(2, 30), "the number of nickels")
    g.given("nickel_value", 5, "the value of a nickel in cents")
    g.given("dimes", c.count(2, 30), "the number of dimes")
    g.given("dime_value", 10, "the value of a dime in cents")
    g.step("nickel_cents", "nickels", "*", "nickel_value", "the value of the nickels")
    g.step("dime_cents", "dimes", "*", "dime_value", "the value of the dimes")
    g.step("cents", "nickel_cents", "+", "dime_cents", "the total value in cents")
    n, d = g.v["nickels"], g.v["dimes"]
    return [f"How many cents does {p.name} have if {p.he} has {n} nickels worth 5 cents each and {d} dimes worth "
            f"10 cents each?",
            f"{p.name}'s piggy bank holds {n} coins of 5 cents and {d} coins of 10 cents. What is the value of the "
            f"coins in cents?"][i]


def fam_fence(c, g):
    i = c.phrasing(2)
    gap = c.count(2, 10)
    g.given("side", gap * c.count(2, 20), "the length of one side in meters")
    g.given("sides", 4, "the number of sides")
    g.given("gap", gap, "the distance between posts")
    g.step("fence", "side", "*", "sides", "the length of the fence")
    g.step("posts", "fence", "/", "gap", "the number of posts")
    v = g.v
    return [f"A square field has sides of {v['side']} meters, and all 4 sides need a fence. Posts go every "
            f"{gap} meters. How many posts are needed?",
            f"What is the number of posts needed around a square pen with 4 sides of {v['side']} meters each, if "
            f"there is a post every {gap} meters?"][i]


def fam_teams(c, g):
    i, t = c.phrasing(2), c.count(2, 6)
    g.given("girls", c.count(5, 30), "the number of girls")
    g.given("boys", c.count(5, 30), "the number of boys")
    g.step("kids", "girls", "+", "boys", "the number of children")
    if i == 1:
        g.given("absent", c.count(2, 6), "the number of absent children")
        g.step("present", "kids", "-", "absent", "the number of children present")
    g.given("team_size", t, "the number of children in each team")
    g.step("teams", g.steps[-1][0], "/", "team_size", "the number of teams")
    v = g.v
    return [f"If a class has {v['girls']} girls and {v['boys']} boys and the teacher makes teams of {t}, how many "
            f"teams are there?",
            f"There are {v['girls']} girls and {v['boys']} boys in a gym class, but {v.get('absent')} are absent. The "
            f"rest form teams of {t}. How many teams are formed?"][i]


def fam_library(c, g):
    i = c.phrasing(2)
    g.given("shelves", c.count(2, 9), "the number of shelves")
    g.given("per_shelf", c.count(10, 60), "the number of books on each shelf")
    g.step("books", "shelves", "*", "per_shelf", "the number of books")
    g.given("lent", c.count(5, 60), "the number of books lent out")
    g.step("in_library", "books", "-", "lent", "the number of books still in the library")
    g.given("returned", c.count(1, 30), "the number of books returned")
    g.step("now", "in_library", "+", "returned", "the number of books on the shelves now")
    v = g.v
    return [f"A library has {v['shelves']} shelves with {v['per_shelf']} books on each shelf. {v['lent']} books are "
            f"lent out and later {v['returned']} come back. How many books are on the shelves now?",
            f"How many books are in the reading room now, if it had {v['per_shelf']} books on each of {v['shelves']} "
            f"shelves, {v['lent']} were borrowed and {v['returned']} were brought back?"][i]


TASK_FAMILIES = {"shopping": fam_shopping, "sharing": fam_sharing, "journey": fam_journey,
                 "percent": fam_percent, "discount": fam_discount, "ages": fam_ages, "recipe": fam_recipe,
                 "wages": fam_wages, "savings": fam_savings, "garden": fam_garden, "bus": fam_bus,
                 "packing": fam_packing, "schedule": fam_schedule, "collection": fam_collection}
DEEP_FAMILIES = ("shopping", "journey", "recipe", "bus", "collection")
TABLE_FAMILIES = ("shopping", "journey", "recipe", "bus")
NOVEL_FAMILIES = {"coins": fam_coins, "fence": fam_fence, "teams": fam_teams, "library": fam_library}


# Base families: the stand-in for pretraining (data/pretrain.jsonl). Disjoint from every task and
# novel family: other stories, other graphs. Depth 1-6 (the number machine), all four operations.
def base_aquarium(c, g):
    p, i = c.person(), c.phrasing(3)
    g.given("tanks", c.count(2, 6), "the number of tanks")
    g.given("fish_per_tank", c.amount(3, 15), "the number of fish in each tank")
    g.step("fish", "tanks", "*", "fish_per_tank", "the number of fish")
    if i == 0:
        g.given("bought", c.amount(1, 20), "the number of fish bought")
        g.step("all_fish", "fish", "+", "bought", "the number of fish after buying")
        g.given("food_each", c.count(2, 5), "the food for one fish in grams")
        g.step("food", "all_fish", "*", "food_each", "the food for all the fish in grams")
    else:
        g.given("sold" if i == 1 else "big_tank", c.amount(1, 20) if i == 1 else c.count(2, 9),
                "the number of fish sold" if i == 1 else "the number of fish a big tank holds")
        g.step("left" if i == 1 else "big_tanks", "fish", "-" if i == 1 else "/", g.givens[-1][0],
               "the number of fish left" if i == 1 else "the number of big tanks")
    v = g.v
    head = f"{p.name} keeps {v['tanks']} tanks with {v['fish_per_tank']} fish in each tank."
    return [f"{head} {p.He} buys {v.get('bought')} more fish. Each fish eats {v.get('food_each')} grams of food a day. "
            f"How many grams of food are needed each day?",
            f"{head} {p.He} sells {v.get('sold')} fish. How many fish are left?",
            f"{head} {p.He} moves all of them into big tanks that hold {v.get('big_tank')} fish each. How many big "
            f"tanks does {p.he} fill?"][i]


def base_train(c, g):
    i = c.phrasing(2)
    g.given("cars", c.count(2, 9), "the number of cars")
    g.given("seats", c.amount(10, 60), "the number of seats in each car")
    g.step("all_seats", "cars", "*", "seats", "the number of seats")
    if i == 0:
        g.given("riders", c.amount(5, 300), "the number of riders")
        g.step("empty", "all_seats", "-", "riders", "the number of empty seats")
    else:
        g.given("ticket", c.count(2, 9), "the price of a ticket")
        g.step("fares", "all_seats", "*", "ticket", "the money from a full train")
    v = g.v
    return [f"A train has {v['cars']} cars with {v['seats']} seats in each car. {v.get('riders')} people ride it. "
            f"How many seats are empty?",
            f"A train has {v['cars']} cars and each car has {v['seats']} seats. A ticket costs {v.get('ticket')} "
            f"dollars. How much money does a full train bring in?"][i]


def base_stamps(c, g):
    p = c.person()
    g.given("pages", c.count(2, 9), "the number of pages")
    g.given("per_page", c.amount(4, 20), "the number of stamps on each page")
    g.step("in_album", "pages", "*", "per_page", "the number of stamps in the album")
    g.given("loose", c.amount(1, 30), "the number of loose stamps")
    g.step("stamps", "in_album", "+", "loose", "the number of stamps")
    g.given("friends", c.count(2, 6), "the number of friends")
    g.step("each", "stamps", "/", "friends", "the number of stamps for each friend")
    v = g.v
    return (f"{p.name} has an album of {v['pages']} pages with {v['per_page']} stamps on each page, and {v['loose']} "
            f"loose stamps. {p.He} shares all the stamps equally among {v['friends']} friends. How many stamps does "
            f"each friend get?")


def base_paint(c, g):
    p = c.person()
    g.given("walls", c.count(2, 8), "the number of walls")
    g.given("cans_per_wall", c.count(2, 5), "the number of cans for one wall")
    g.step("cans", "walls", "*", "cans_per_wall", "the number of cans")
    g.given("can_price", c.amount(5, 30), "the price of one can")
    g.step("cost", "cans", "*", "can_price", "the cost of the paint")
    g.given("paid", g.v["cost"] + c.amount(1, 50), "the money paid")
    g.step("change", "paid", "-", "cost", "the change")
    v = g.v
    return (f"{p.name} paints {v['walls']} walls. Each wall needs {v['cans_per_wall']} cans of paint, and a can costs "
            f"{v['can_price']} dollars. {p.He} pays with {v['paid']} dollars. How much change does {p.he} get?")


def base_orchard(c, g):
    p, i = c.person(), c.phrasing(2)
    g.given("apples", c.amount(10, 80), "the number of apples")
    g.given("pears", c.amount(10, 80), "the number of pears")
    g.step("fruit", "apples", "+", "pears", "the number of pieces of fruit")
    g.given("price", c.count(2, 9), "the price of one piece of fruit")
    g.step("sales", "fruit", "*", "price", "the money from the fruit")
    if i == 1:
        g.given("cart", c.amount(5, 40), "the cost of the cart")
        g.step("profit", "sales", "-", "cart", "the money left")
    v = g.v
    return [f"{p.name} picks {v['apples']} apples and {v['pears']} pears and sells each piece of fruit for "
            f"{v['price']} dollars. How much money does {p.he} get?",
            f"An orchard gives {v['apples']} apples and {v['pears']} pears. Every piece sells for {v['price']} "
            f"dollars, and renting the cart costs {v.get('cart')} dollars. How much money is left?"][i]


def base_machine(c, g):
    words = {"+": ("add", "adds {}"), "-": ("take", "subtracts {}"), "*": ("times", "multiplies the result by {}"),
             "/": ("split", "divides the result by {}")}
    cur = g.given("start", c.amount(2, 50), "the starting number")
    said, depth = [], c.count(1, 6)
    for j, L in enumerate("abcdef"[:depth]):
        x = g.v[cur]
        ops = [o for o in "+-*/" if (o != "/" or any(x % d == 0 for d in range(2, 10))) and (o != "-" or x > 1)]
        op = c.rng.choice(ops)
        y = (c.rng.choice([d for d in range(2, 10) if x % d == 0]) if op == "/" else c.count(2, 5) if op == "*"
             else c.rng.randint(1, x - 1) if op == "-" else c.amount(1, 50))
        name, phrase = words[op]
        g.given(f"{name}_{L}", y, f"the number used in the {ORD[j]} step")
        cur = g.step("result" if j == depth - 1 else f"value_{L}", cur, op, f"{name}_{L}",
                     f"the number after the {ORD[j]} step")
        first = "First it " + phrase.replace("the result", "it")
        said.append((first if j == 0 else "Then it " + phrase).format(y) + ".")
    return f"A number machine starts with {g.v['start']}. {' '.join(said)} What number comes out?"


BASE_FAMILIES = {"aquarium": base_aquarium, "train_cars": base_train, "stamps": base_stamps, "paint": base_paint,
                 "orchard": base_orchard, "machine": base_machine}
BINDING_WORDS = ("cups plates boxes coins seeds stones cards beads rocks leaves tiles bricks ropes bells keys hats "
                 "socks kites drums jars nails pins buttons spoons forks desks ships trucks trees birds ants bees "
                 "x y z a b c m n p q r s t u v w total rest part share").split()


# ---------------------------------------------------------------------------------------------
# Splits and the base corpus
# ---------------------------------------------------------------------------------------------
def sample(fn, rng, **kw):
    """One valid draw of a family: (question, graph, ctx). Rejection-samples the numbers."""
    for _ in range(5000):
        c = Ctx(rng, **kw)
        g = Graph(c.limit)
        try:
            q = fn(c, g)
        except _Resample:
            continue
        return q, g, c
    raise RuntimeError(f"{fn.__name__}: no valid draw in 5000 tries")


def world_record(pid, source, family, q, g, c):
    prog = g.program()
    v = program_values(prog)
    return {"id": pid, "question": q, "answer": str(v[prog["steps"][-1][0]]),
            "intermediates": [str(v[s[0]]) for s in prog["steps"]], "solution": program_solution(prog),
            "source": source, "family": family, "template": f"{family}/{'table' if c.table else c.template}",
            "steps": len(prog["steps"]), "entities": list(c.entities), "program": prog}


def make_split(name, n, cfg: WorldConfig, exclude=()):
    """n problems of one split, none of whose questions is in exclude or repeated."""
    rng = random.Random(f"{cfg.seed}/{name}")
    fams = {"ood_deep": DEEP_FAMILIES, "ood_table": TABLE_FAMILIES, "ood_novel": tuple(NOVEL_FAMILIES)}.get(
        name, tuple(TASK_FAMILIES))
    seen, out, misses = set(exclude), [], 0
    while len(out) < n:
        fam = rng.choice(fams)
        kw = dict(limit=cfg.max_value, deep=name == "ood_deep", table=name == "ood_table",
                  pool=1 if name == "ood_symbolic" else 0)
        if name == "ood_hard":
            kw["scale"] = rng.randint(cfg.hard_min, cfg.hard_max)
        q, g, c = sample(TASK_FAMILIES.get(fam) or NOVEL_FAMILIES[fam], rng, **kw)
        if q in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise RuntimeError(f"{name}: cannot find {n} distinct questions")
            continue
        seen.add(q)
        out.append(world_record(f"{name}-{len(out):05d}", f"world/{name}", fam, q, g, c))
    return out


_ALL = dict(names=NAMES[0] + NAMES[1], things={k: (v[0] + ";" + v[1]).split(";") for k, v in THINGS.items()})


def base_problem(rng, cfg: WorldConfig, pid="base", family=None):
    fam = family or rng.choice(tuple(BASE_FAMILIES))
    scale = rng.randint(cfg.hard_min, cfg.hard_max) if rng.random() < cfg.base_big else 1
    q, g, c = sample(BASE_FAMILIES[fam], rng, scale=scale, limit=cfg.max_value, **_ALL)
    return world_record(pid, "base", fam, q, g, c)


def _mag(rng, big):
    d = rng.randint(3, 6) if big else rng.randint(1, 3)
    return rng.randint(max(2, 10 ** (d - 1)), 10 ** d - 1)


def drill_doc(rng, cfg):
    lines = []
    for _ in range(rng.randint(4, 10)):
        big, op = rng.random() < cfg.base_big, rng.choice("+-*/")
        a, b = _mag(rng, big), _mag(rng, big)
        if op in "*/":
            b = rng.randint(2, 99 if rng.random() < 0.3 else 9)
        if op == "/":
            a = a * b
        if op == "-" and a < b:
            a, b = b, a
        lines.append(f"{a} {op} {b} = {_apply(op, a, b)}")
    return "\n".join(lines)


def binding_doc(rng, cfg):
    """Values bound to names, a plan of formulas, its execution: binding and executing, no story."""
    scale = rng.randint(cfg.hard_min, cfg.hard_max) if rng.random() < cfg.base_big else 1
    names = rng.sample(BINDING_WORDS, 10)
    while True:
        g = Graph(cfg.max_value * scale)
        for w in names[:rng.randint(2, 4)]:
            g.given(w, rng.randint(2, 60 * scale if rng.random() < 0.5 else 9), "")
        for w in names[len(g.givens):len(g.givens) + rng.randint(1, 5)]:
            for _ in range(20):
                a, b = rng.sample(list(g.v), 2)
                try:
                    g.step(w, a, rng.choice("+-*/"), b, "")
                    break
                except _Resample:
                    pass
        if g.steps:
            break
    prog = g.program()
    given = ", ".join(f"{var} = {val}" for var, val, _ in prog["givens"])
    plan = "\n".join(f"{var} = {a} {op} {b}." for var, a, op, b, _ in prog["steps"])
    return (f"Given: {given}.\nPlan:\n{plan}\nThe answer is {prog['steps'][-1][0]}.\nExecution:\n"
            + program_execution(prog))


def pretrain_corpus(cfg: WorldConfig, exclude=()):
    """The base corpus: {"text"} documents of five kinds. Returns (texts, counts per kind)."""
    rng = random.Random(f"{cfg.seed}/pretrain")
    kinds = {"plan": 0.35, "cot": 0.2, "binding": 0.2, "drill": 0.15, "story": 0.1}
    texts, counts, exclude = [], dict.fromkeys(kinds, 0), set(exclude)
    while len(texts) < cfg.n_pretrain:
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        if kind == "drill":
            text = drill_doc(rng, cfg)
        elif kind == "binding":
            text = binding_doc(rng, cfg)
        else:
            p = base_problem(rng, cfg)
            if p["question"] in exclude:
                continue
            prog = p["program"]
            if kind == "plan":
                text = f"Question: {p['question']}\n{program_plan(prog)}{program_execution(prog)}"
            elif kind == "cot":
                text = f"Question: {p['question']}\n{program_solution(prog, annotate=False)}"
            else:
                facts = [f"{_cap(d)} is {val}." for _, val, d in prog["givens"]]
                rng.shuffle(facts)
                text = f"Story: {p['question']}\nFacts:\n" + "\n".join(facts)
        texts.append(text)
        counts[kind] += 1
    return texts, counts


# ---------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------
_WORD_NUMS = {w: (i,) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                            "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_NUMS.update({w: (10 * i,) for i, w in enumerate(_TENS_WORDS, 2)})
_WORD_NUMS.update({"hundred": (100,), "thousand": (1000,), "million": (1e6,), "dozen": (12,), "twice": (2,),
                   "double": (2,), "thrice": (3,), "triple": (3,), "half": (2, 0.5), "quarter": (4, 0.25)})


def question_values(question: str) -> list[float]:
    """Every value a question states: its numbers (a fraction also gives its two parts), its number
    words ("twenty-five", "half" = 2 and 0.5) and 100 when it speaks of a percentage."""
    vals = []
    for s, e, v in number_spans(question):
        vals.append(v)
        if "/" in question[s:e]:
            vals += [abs(float(x.replace(",", ""))) for x in question[s:e].lstrip("-").split("/")]
    for w in re.findall(r"[a-z]+", question.lower()):
        vals += _WORD_NUMS.get(w, ())
    for a, b in re.findall(r"(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)-([a-z]+)", question.lower()):
        if b in _WORD_NUMS and _WORD_NUMS[b][0] < 10:
            vals.append(_WORD_NUMS[a][0] + _WORD_NUMS[b][0])
    if "%" in question or re.search(r"(?i)per ?cent", question):
        vals.append(100.0)
    return [float(v) for v in vals]


def _same(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _is_label(text, s, e):
    """'Step 2' and a line-leading '2.' / '2)' (at most 20) number the steps; they are not quantities."""
    if not re.fullmatch(r"\d+", text[s:e]) or int(text[s:e]) > 20:
        return False
    line = text[text.rfind("\n", 0, s) + 1:s]
    return bool(re.search(r"(?i)\bstep\s*#?$", text[max(0, s - 8):s])) or (
        line.strip() == "" and re.match(r"[.)]\s", text[e:e + 2] + " ") is not None)


def find_computed_numbers(text: str, question: str) -> list[str]:
    """The numbers of text (as written) whose value is not among the question's values."""
    qv = question_values(question)
    return [text[s:e] for s, e, v in number_spans(text)
            if not _is_label(text, s, e) and not any(_same(v, q) for q in qv)]


class Rejected(Exception):
    """A teacher answer that fails validation; str() is the reason recorded in *.rejected.jsonl."""


def check_meta_thought(meta_thought: str, question: str) -> str:
    body = meta_thought.replace("Plan:", "").replace("Execution:", "").strip()
    if not body:
        raise Rejected("empty meta-thought")
    bad = find_computed_numbers(meta_thought, question)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise Rejected(f"computed number {bad[0]} in the meta-thought{more}")
    return meta_thought


def check_cot(cot: str, answer: str) -> str:
    pred = extract_answer(cot)
    if pred is None:
        raise Rejected("no final 'The answer is N.' line")
    if not answers_match(pred, answer):
        raise Rejected(f"final answer {pred} is not the gold answer {answer}")
    return cot


# ---------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------
def prompt_text(problem) -> str:
    """The prompt every stage uses: 'Question: {question}\\n'."""
    return f"Question: {problem['question'] if isinstance(problem, dict) else problem}\n"


def sft_pair(problem, completion, kind):
    pair = {"id": problem["id"], "prompt": prompt_text(problem), "completion": completion}
    if kind == "comt":
        pair["eos"] = False     # a prefix the student continues: no EOS after "Execution:\n"
    return pair


def programmatic_teacher(problem, kind="comt") -> str:
    """From the computation graph: CoT with every number, CoMT with variables only."""
    prog = problem.get("program")
    if not prog:
        raise Rejected("no 'program' field: the programmatic teacher needs world problems (try --teacher rule)")
    if kind == "cot":
        return program_solution(prog, annotate=False)
    return check_meta_thought(program_plan(prog), problem["question"])


_STOP = set("a an the of to for and in on at per each every her his their its is are was were with from by than as "
            "that this he she they it so then there which who what how many much more less total all she's he's".split())
_CONVENTIONS = (1, 2, 3, 4, 7, 10, 12, 24, 30, 52, 60, 100, 1000, 365, 0.5, 0.25, 0.75, 0.1)
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(v: float) -> str:
    """A constant in words, so a meta-thought can name it without writing a number: 0.25 -> 'one quarter'."""
    if v < 0:
        return "minus " + number_words(-v)
    if v != int(v):
        special = {0.5: "one half", 0.25: "one quarter", 0.75: "three quarters"}
        if v in special:
            return special[v]
        whole, frac = f"{v:.6f}".rstrip("0").split(".")
        return number_words(int(whole)) + " point " + " ".join(_ONES[int(d)] for d in frac)
    n = int(v)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    for size, word in ((10 ** 6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return number_words(n // size) + " " + word + (" " + number_words(rest) if rest else "")


def _name_from(text, taken, fallback):
    """A variable name from the first content words of text: 'clips in May.' -> 'clips_may'."""
    words = []
    for w in re.findall(r"[A-Za-z]+|\d", re.split(r"[.?!;\n]", text, maxsplit=1)[0]):
        if w.isdigit():
            break
        if w.lower() not in _STOP and len(w) > 1:
            words.append(w.lower())
    base = "_".join(words[:2]) or fallback
    name, k = base, 0
    while name in taken or name in _WORD_NUMS:
        name, k = f"{base}_{'bcdefghijklmnopqrstuvwxyz'[k % 25]}" + ("" if k < 25 else "_" + "x" * (k // 25)), k + 1
    taken.add(name)
    return name


def _phrase(text, limit=6):
    """The start of text, as written, up to a punctuation mark, a digit or `limit` words."""
    stop = re.search(r"[,.?!;:\n]|\d", text)
    s = text[:stop.start()] if stop else text
    words = list(re.finditer(r"[A-Za-z']+", s))[:limit]
    return s[:words[-1].end()] if words else ""


def rule_teacher(problem, kind="comt") -> str:
    """Abstraction of an annotated solution (GSM8K <<a*b=c>>): every question number and every computed
    value becomes a named variable; constants the question states in words or by convention (60 minutes,
    100 for percentages) are written in words; anything else is rejected with the number named."""
    q, sol, answer = problem["question"], problem.get("solution") or "", problem["answer"]
    if kind == "cot":
        lines = [ln for ln in strip_annotations(sol).splitlines()
                 if ln.strip() and not ln.startswith("####") and not ln.startswith("The answer is")]
        return check_cot("\n".join(lines + [f"The answer is {answer}."]), answer)
    anns = list(_ANN.finditer(sol))
    if not anns:
        raise Rejected("no <<expr=value>> annotations in the solution")
    spans = number_spans(q)
    allowed = set(question_values(q)) | {float(x) for x in _CONVENTIONS}
    taken, lets, steps, given, computed = set(), [], [], {}, []

    def given_var(i):
        if i not in given:
            s, e, _ = spans[i]
            snippet = _phrase(q[e:])
            given[i] = _name_from(snippet, taken, "value")
            lets.append(f'Let {given[i]} be the number in "{q[s:e]}{snippet}".')
        return given[i]

    def symbol(v, expr):
        for cv, var in reversed(computed):
            if _same(cv, v):
                return ast.Name(var)
        for i, (_, _, qv) in enumerate(spans):
            if _same(qv, v):
                return ast.Name(given_var(i))
        for i, (_, _, qv) in enumerate(spans):
            if _same(qv, v * 100):
                return ast.BinOp(ast.Name(given_var(i)), ast.Div(), ast.Name("one hundred"))
        if any(_same(a, v) for a in allowed):
            return ast.Name(number_words(v))
        raise Rejected(f"number {format_number(v)} in <<{expr}>> is neither in the question nor computed before")

    class Sym(ast.NodeTransformer):
        def __init__(self, expr):
            self.expr = expr

        def visit_Constant(self, node):
            return symbol(float(node.value), self.expr)

    for m in anns:
        expr, stated = m.group(1).strip(), m.group(2)
        try:
            tree = ast.parse(expr, mode="eval")
            val = safe_eval(tree.body)
        except (SyntaxError, ValueError):
            raise Rejected(f"annotation <<{expr}={stated}>> is not arithmetic") from None
        sv = parse_number(stated)
        if sv is None or not math.isclose(sv, val, rel_tol=1e-4, abs_tol=1e-4):
            raise Rejected(f"annotation <<{expr}={stated}>> does not evaluate to its stated value")
        rhs = ast.unparse(Sym(expr).visit(tree))
        desc = _phrase(re.sub(r"^\s*\$?-?[\d.,]*\d%?", "", sol[m.end():])).strip()
        if not desc:   # "... she earned 0.2 x 50 = $<<0.2*50=10>>10.": the words before the numbers
            before = re.findall(r"[A-Za-z']{2,}", sol[sol.rfind("\n", 0, m.start()) + 1:m.start()])
            desc = " ".join(before[-3:])
        var = _name_from(desc, taken, "step")
        desc = desc or "the next value"
        steps.append(f"Find {desc}: {var} = {rhs}.")
        computed.append((val, var))
    gold = parse_number(answer)
    final = next((var for cv, var in reversed(computed) if gold is not None and _same(cv, gold)), None)
    if final is None:
        raise Rejected(f"the answer {answer} is not the result of any annotated step")
    text = "\n".join(["Plan:"] + lets + steps + [f"The answer is {final}.", "Execution:", ""])
    return check_meta_thought(text, q)


def llm_completion(problem, answer_text, kind):
    """An LLM answer as our completion: the meta-thought up to any 'Execution:', framed as the plan."""
    t = (answer_text or "").strip()
    if kind == "cot":
        return check_cot(t, problem["answer"])
    t = re.sub(r"^```\w*\n?|\n?```$", "", t.split("Execution:")[0].strip()).strip()
    t = re.sub(r"^Plan:\s*", "", t)
    return check_meta_thought(f"Plan:\n{t}\nExecution:\n", problem["question"])


class PairWriter:
    """Append-only, resumable output of a teacher: one line per problem, flushed as it completes.
    Problems already in out are skipped; so are those in the rejected file, except transport
    failures (timeouts, HTTP errors), which a rerun tries again. A torn last line (a kill mid-write)
    is cut off before appending."""

    def __init__(self, out, kind):
        self.out, self.kind = Path(out), kind
        self.rej = self.out.with_name(self.out.name.removesuffix(".jsonl") + ".rejected.jsonl")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.done = {r["id"] for r in self._read(self.out)}
        self.final = {r["id"] for r in self._read(self.rej) if r.get("kind") != "transport"}
        self.stats = {"written": 0, "rejected": 0, "transport": 0, "skipped": 0}
        self._f, self._r = None, None

    @staticmethod
    def _read(path):
        if not path.exists():
            return []
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            print(f"warning: {path}: cutting off a torn last line ({len(raw) - keep} bytes)", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(keep)
            raw = raw[:keep]
        rows = []
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line))
                rows[-1]["id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: expected a JSON object with an 'id' (earlier teacher output)") from None
        return rows

    def todo(self, problems):
        out = [p for p in problems if p["id"] not in self.done and p["id"] not in self.final]
        self.stats["skipped"] = len(problems) - len(out)
        return out

    def _append(self, which, obj):
        if which == "out":
            self._f = self._f or open(self.out, "a", encoding="utf-8")
            f = self._f
        else:
            self._r = self._r or open(self.rej, "a", encoding="utf-8")
            f = self._r
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()

    def write(self, problem, completion):
        self._append("out", sft_pair(problem, completion, self.kind))
        self.done.add(problem["id"])
        self.stats["written"] += 1

    def reject(self, problem, reason, kind="invalid", answer=None):
        self._append("rej", {"id": problem["id"], "kind": kind, "reason": reason, "answer": answer})
        self.stats["transport" if kind == "transport" else "rejected"] += 1

    def close(self):
        for f in (self._f, self._r):
            if f:
                f.close()


class _Transient(Exception):
    """A failed request: retried with backoff (retry=False: only on a rerun), then recorded as transport."""

    def __init__(self, msg, retry=True):
        super().__init__(msg)
        self.retry = retry


def chat_completion(cfg: TeacherConfig, content: str) -> str:
    """One request to an OpenAI-compatible /chat/completions endpoint; the answer's text."""
    url = cfg.teacher_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    body = json.dumps({"model": cfg.teacher_model, "messages": [{"role": "user", "content": content}],
                       "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=cfg.timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:   # 4xx but 408/429 will not change within this run
        raise _Transient(f"HTTP {e.code} from {url}", retry=e.code >= 500 or e.code in (408, 429)) from None
    except (OSError, ValueError) as e:   # URLError, timeouts, resets, a bad URL
        raise _Transient(f"no answer from {url}: {getattr(e, 'reason', e)}") from None
    try:
        text = json.loads(raw)["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError
        return text
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(f"{url} answered something that is not a chat completion: {raw[:60]!r}") from None


def openai_teacher(problems, cfg: TeacherConfig, writer: PairWriter):
    instruction = COT_INSTRUCTION if cfg.kind == "cot" else COMT_INSTRUCTION

    def ask(p):   # in a worker thread: (status, completion or reason, raw answer)
        for attempt in range(cfg.retries + 1):
            try:
                answer = chat_completion(cfg, f"{instruction}\n\nQuestion: {p['question']}")
            except _Transient as e:
                if attempt == cfg.retries or not e.retry:
                    return "transport", f"{e} ({attempt + 1} attempts)", None
                time.sleep(cfg.backoff * 2 ** attempt * (1 + 0.1 * random.random()))   # jitter spreads workers
                continue
            try:
                return "ok", llm_completion(p, answer, cfg.kind), answer
            except Rejected as e:
                return "invalid", str(e), answer

    with ThreadPoolExecutor(max(1, cfg.workers)) as ex:
        futures = {ex.submit(ask, p): p for p in problems}
        try:
            for f in as_completed(futures):
                status, text, answer = f.result()
                if status == "ok":
                    writer.write(futures[f], text)
                else:
                    writer.reject(futures[f], text, status, answer)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def local_teacher(problems, cfg: TeacherConfig, writer: PairWriter):
    """Any checkpoint through model.py / tokenizer.py (imported here, only when used), batched."""
    import torch
    from model import Transformer, generate
    from tokenizer import Tokenizer
    tok, model = Tokenizer.load(cfg.ckpt), Transformer.from_pretrained(cfg.ckpt).eval()
    instruction = COT_INSTRUCTION if cfg.kind == "cot" else COMT_INSTRUCTION
    stop = set(tok.stop_ids)
    for i in range(0, len(problems), cfg.batch_size):
        batch = problems[i:i + cfg.batch_size]
        prompts = [tok.render(prompt_text(p) if cfg.local_prompt == "plain" else
                              f"{instruction}\n\nQuestion: {p['question']}\n")[0] for p in batch]
        with torch.no_grad():
            gen = generate(model, prompts, cfg.max_tokens, temperature=cfg.temperature, stop_ids=stop,
                           pad_id=tok.pad_id)
        for row, p in enumerate(batch):
            ids = [t for t, m in zip(gen.tokens[row].tolist(), gen.mask[row].tolist()) if m and t not in stop]
            answer = tok.decode(ids)
            try:
                writer.write(p, llm_completion(p, answer, cfg.kind))
            except Rejected as e:
                writer.reject(p, str(e), "invalid", answer)


def teach(cfg: TeacherConfig, problems=None) -> dict:
    """Run one teacher over a problems file into cfg.out (+ .rejected.jsonl). Returns counts."""
    if cfg.teacher not in ("programmatic", "rule", "openai", "local") or cfg.kind not in ("comt", "cot"):
        raise DataError(f"--teacher {cfg.teacher} --kind {cfg.kind}: expected programmatic|rule|openai|local "
                        f"and comt|cot")
    if not cfg.out:
        raise DataError("--out is required: the output .jsonl")
    problems = problems if problems is not None else load_problems(cfg.problems)
    problems = problems[:cfg.limit] if cfg.limit else problems
    if cfg.teacher in ("programmatic", "rule"):   # fast and deterministic: rewrite the whole file
        fn = programmatic_teacher if cfg.teacher == "programmatic" else rule_teacher
        pairs, rejected = [], []
        for p in problems:
            try:
                pairs.append(sft_pair(p, fn(p, cfg.kind), cfg.kind))
            except Rejected as e:
                rejected.append({"id": p["id"], "kind": "invalid", "reason": str(e)})
        out = Path(cfg.out)
        write_jsonl(out, pairs)
        write_jsonl(out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl"), rejected)
        return {"written": len(pairs), "rejected": len(rejected)}
    if cfg.teacher == "local" and not cfg.ckpt:
        raise DataError("--teacher local needs --ckpt DIR")
    writer = PairWriter(cfg.out, cfg.kind)
    try:
        todo = writer.todo(problems)
        (openai_teacher if cfg.teacher == "openai" else local_teacher)(todo, cfg, writer)
    finally:
        writer.close()
    return writer.stats


# ---------------------------------------------------------------------------------------------
# Problems files and the real benchmarks
# ---------------------------------------------------------------------------------------------
def problem_from(obj, where, default_id, source="unknown"):
    """One problems-format dict from a line of ours or of GSM8K ('answer' ending in '#### N')."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with id, question, answer")
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}' (expected a problem with id, question, answer)")
    q, ans = obj["question"], obj["answer"]
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string")
    p = dict(obj)
    if isinstance(ans, str) and "####" in ans:   # GSM8K's own format: the worked solution, then #### N
        p["solution"], ans = ans, ans.rsplit("####", 1)[1].strip()
        source = "gsm8k" if source == "unknown" else source
    norm = normalize_answer(ans) if isinstance(ans, (str, int, float)) and not isinstance(ans, bool) else None
    if norm is None:
        raise DataError(f"{where}: answer {ans!r} is not a number")
    p["answer"] = norm
    p["id"] = str(obj.get("id", default_id))
    p.setdefault("solution", "")
    if not isinstance(p.get("intermediates"), list):
        values = [parse_number(s) for _, s in annotations(p["solution"])]
        p["intermediates"] = [format_number(v) for v in values if v is not None]
    p["intermediates"] = [str(x) for x in p["intermediates"]]
    p.setdefault("source", source)
    return p


def _read_jsonl(path):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
    return rows


def load_problems(path) -> list[dict]:
    """A problems .jsonl (ours, or GSM8K's own lines) as dicts with id, question, answer (canonical
    number string), intermediates (strings), solution, source, plus whatever else the line holds."""
    rows = _read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no problems in the file")
    out, ids = [], {}
    for n, obj in rows:
        p = problem_from(obj, f"{path}:{n}", f"{Path(path).stem}-{n}")
        if p["id"] in ids:
            raise DataError(f"{path}:{n}: id {p['id']!r} already used on line {ids[p['id']]}")
        ids[p["id"]] = n
        out.append(p)
    return out


def write_jsonl(path, rows):
    """Atomically: path.tmp, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


_SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def equation_steps(expr: str):
    """An equation such as '( 76.0 - 25.0 ) / 3' as GSM8K-annotated steps and their values
    (innermost first). Units in parentheses ('2 (hour)*60 (min/hour)') are dropped."""
    expr = re.sub(r"\(\s*[A-Za-z][^()]*\)", "", expr)
    node = ast.parse(expr.strip(), mode="eval").body
    lines, values = [], []

    def walk(n):
        if isinstance(n, ast.BinOp) and type(n.op) in _SYM:
            a, b = walk(n.left), walk(n.right)
            v = safe_eval(ast.BinOp(ast.Constant(a), n.op, ast.Constant(b)))
            fa, fb, fv, s = format_number(a), format_number(b), format_number(v), _SYM[type(n.op)]
            lines.append(f"{fa} {s} {fb} = <<{fa}{s}{fb}={fv}>>{fv}")
            values.append(fv)
            return v
        return safe_eval(n)

    walk(node)
    return "\n".join(lines), values


def _formula(p, formula):
    """Gold steps from a formula 'a+b=c; c*2=d' where every part parses; none otherwise."""
    try:
        parts = [equation_steps(x.split("=")[0]) for x in formula.split(";") if "=" in x]
    except (SyntaxError, ValueError):
        parts = []
    if parts:
        p["solution"] = "\n".join(s for s, _ in parts)
        p["intermediates"] = [v for _, vs in parts for v in vs]
    return p


def pal_intermediates(code: str, target: float) -> list[str]:
    """Every operation's value in a PAL program (GSM-Hard), interpreted with ast, never executed.
    Empty when the program does anything but assignments of arithmetic, or disagrees with target."""
    try:
        fn = next(n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef))
        env, vals = {}, []
        for st in fn.body:
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                env[st.targets[0].id] = safe_eval(st.value, env, vals)
            elif isinstance(st, ast.Return):
                ok = math.isclose(safe_eval(st.value, env), target, rel_tol=1e-6, abs_tol=1e-6)
                return [format_number(v) for v in vals] if ok else []
            else:
                return []
    except (SyntaxError, ValueError, StopIteration, TypeError, RecursionError):
        pass
    return []


FORMATS = ("problems", "gsm8k", "svamp", "asdiv", "mawps", "tabmwp", "gsm_hard", "gsm_symbolic")


def convert(fmt: str, path) -> tuple[list[dict], int]:
    """A benchmark file as problems. Returns (problems, skipped): skipped counts items whose answer is
    not a number (ASDiv's '3:30 p.m.', TabMWP's text answers, ASDiv's multi-answer items)."""
    path, stem, out, skipped = str(path), Path(path).stem, [], 0
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")

    def add(where, pid, question, answer, **extra):
        nonlocal skipped
        a = normalize_answer(answer) if not isinstance(answer, bool) else None
        if a is None or not str(question).strip():
            skipped += 1
            return None
        p = {"id": pid, "question": " ".join(str(question).split(" ")).strip(), "answer": a, "intermediates": [],
             "solution": "", "source": fmt, **extra}
        out.append(p)
        return p

    def load_json():
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

    def need(obj, where, *keys):
        if not isinstance(obj, dict) or any(k not in obj for k in keys):
            raise DataError(f"{where}: expected an object with fields {', '.join(keys)}")
        return obj

    if fmt in ("problems", "gsm8k"):
        out = [problem_from(o, f"{path}:{n}", f"{fmt}-{stem}-{i}", source=fmt if fmt == "gsm8k" else "unknown")
               for i, (n, o) in enumerate(_read_jsonl(path))]
    elif fmt == "gsm_symbolic":
        for n, o in _read_jsonl(path):
            need(o, f"{path}:{n}", "question", "answer")
            p = problem_from(o, f"{path}:{n}", f"gsm_symbolic-{o.get('id')}-{o.get('instance')}", source=fmt)
            p["id"] = f"gsm_symbolic-{o.get('id')}-{o.get('instance')}"
            p["source"] = fmt
            out.append(p)
    elif fmt == "svamp":
        data = load_json()
        for i, o in enumerate(data if isinstance(data, list) else []):
            need(o, f"{path}: item {i}", "Body", "Question", "Answer")
            body = o["Body"].strip()
            body += "" if body.endswith((".", "?", "!", ",")) else "."
            p = add(f"{path}: item {i}", f"svamp-{o.get('ID', i)}", f"{body} {o['Question'].strip()}", o["Answer"])
            if p and o.get("Equation"):
                _formula(p, o["Equation"] + "=")
    elif fmt == "asdiv":
        if path.endswith(".xml"):
            try:
                items = [(e.get("ID"), e.findtext("Body", ""), e.findtext("Question", ""), e.findtext("Answer", ""),
                          e.findtext("Formula", "")) for e in ET.parse(path).getroot().iter("Problem")]
            except ET.ParseError as e:
                raise DataError(f"{path}:{e.position[0]}: not valid XML ({e})") from None
        else:
            items = [(o.get("idx", n - 1), o["body"], o["question"], o["answer"], o.get("formula", ""))
                     for n, o in _read_jsonl(path) if need(o, f"{path}:{n}", "body", "question", "answer")]
        for pid, body, question, answer, formula in items:
            p = add(path, f"asdiv-{pid}", f"{body.strip()} {question.strip()}", answer if ";" not in answer else "")
            if p and formula:
                _formula(p, formula)
    elif fmt == "mawps":
        for i, (n, o) in enumerate(_read_jsonl(path)):
            need(o, f"{path}:{n}", "input", "target")
            add(f"{path}:{n}", f"mawps-{o.get('type', stem)}-{o.get('idx', i)}", o["input"], o["target"])
    elif fmt == "tabmwp":
        data = load_json()
        for pid, o in (data.items() if isinstance(data, dict) else []):
            need(o, f"{path}: problem {pid}", "question", "answer", "table")
            if o.get("ans_type") not in ("integer_number", "decimal_number"):
                skipped += 1
                continue
            q = "\n".join(x for x in (o.get("table_title"), o["table"], o["question"]) if x)
            if o.get("choices"):
                q += "\nChoices: " + ", ".join(map(str, o["choices"]))
            p = add(path, f"tabmwp-{pid}", q, o["answer"], unit=o.get("unit"))
            if p:
                p["solution"] = o.get("solution") or ""
                p["intermediates"] = [format_number(v) for s in re.findall(r"=\s*\$?(-?[\d,]*\.?\d+)", p["solution"])
                                      if (v := parse_number(s)) is not None]
    elif fmt == "gsm_hard":
        for i, (n, o) in enumerate(_read_jsonl(path)):
            need(o, f"{path}:{n}", "input", "target")
            p = add(f"{path}:{n}", f"gsm_hard-{i}", o["input"], o["target"])
            if p and isinstance(o.get("code"), str):
                p["intermediates"] = pal_intermediates(o["code"], float(o["target"]))
    else:
        raise DataError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if not out:
        raise DataError(f"{path}: no {fmt} problems found")
    return out, skipped


# ---------------------------------------------------------------------------------------------
# The embedded default, end to end
# ---------------------------------------------------------------------------------------------
def length_stats(texts, tokenizer_dir=""):
    """Mean length of texts: tokens with a tokenizer directory, else characters and whitespace words."""
    n = max(1, len(texts))
    if tokenizer_dir:
        from tokenizer import Tokenizer
        try:
            tok = Tokenizer.load(tokenizer_dir)
        except (ValueError, OSError) as e:
            raise DataError(f"--tokenizer {tokenizer_dir}: {e}") from None
        return {"tokens": sum(len(tok.encode(t)) for t in texts) / n}
    return {"chars": sum(map(len, texts)) / n, "words": sum(len(t.split()) for t in texts) / n}


def build_world(cfg: WorldConfig) -> dict:
    """Everything under cfg.out: world splits, base corpus (+ held-out base problems), SFT sets."""
    if min(cfg.n_train, cfg.n_test, cfg.n_ood, cfg.n_pretrain, cfg.n_pretrain_test) < 1 or not (
            1 <= cfg.hard_min <= cfg.hard_max) or cfg.max_value < 100 or not 0 <= cfg.base_big <= 1:
        raise DataError(f"bad world config {asdict(cfg)}: sizes >= 1, 1 <= hard_min <= hard_max, max_value >= 100, "
                        f"0 <= base_big <= 1")
    out = Path(cfg.out)
    splits = {"train": make_split("train", cfg.n_train, cfg)}
    seen = {p["question"] for p in splits["train"]}
    splits["test_id"] = make_split("test_id", cfg.n_test, cfg, exclude=seen)
    seen |= {p["question"] for p in splits["test_id"]}
    for name in SPLITS[2:]:
        splits[name] = make_split(name, cfg.n_ood, cfg, exclude=seen)
    rng, held, asked = random.Random(f"{cfg.seed}/pretrain_test"), [], set()
    while len(held) < cfg.n_pretrain_test:
        p = base_problem(rng, cfg, f"pretrain_test-{len(held):05d}")
        if p["question"] not in asked:
            held.append(p)
            asked.add(p["question"])
    texts, kinds = pretrain_corpus(cfg, exclude={p["question"] for p in held})
    cot = [sft_pair(p, programmatic_teacher(p, "cot"), "cot") for p in splits["train"]]
    comt = [sft_pair(p, programmatic_teacher(p, "comt"), "comt") for p in splits["train"]]
    for name, rows in splits.items():
        write_jsonl(out / "world" / f"{name}.jsonl", rows)
    write_jsonl(out / "pretrain.jsonl", [{"text": t} for t in texts])
    write_jsonl(out / "pretrain_test.jsonl", held)
    write_jsonl(out / "cot.jsonl", cot)
    write_jsonl(out / "comt.jsonl", comt)
    tok = cfg.tokenizer or ("base" if Path("base").is_dir() else "")
    return {"splits": {k: len(v) for k, v in splits.items()}, "pretrain_docs": len(texts), "pretrain_kinds": kinds,
            "pretrain_mb": sum(len(t.encode()) for t in texts) / 1e6, "pretrain_test": len(held),
            "cot": length_stats([r["completion"] for r in cot], tok),
            "comt": length_stats([r["completion"] for r in comt], tok),
            "tokenizer": tok or None}


def _flags(parser, cls):
    for f in fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["build"] + argv
    ap = argparse.ArgumentParser(description="Problems, teachers and SFT sets for CoMT (see the module docstring).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _flags(sub.add_parser("build", help="the embedded default under --out (the default command)"), WorldConfig)
    _flags(sub.add_parser("teach", help="SFT pairs from a problems file with a teacher"), TeacherConfig)
    c = sub.add_parser("convert", help="a benchmark file into the problems format")
    c.add_argument("--format", required=True, choices=FORMATS)
    c.add_argument("--in", dest="inp", required=True)
    c.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        t0 = time.time()
        if args.cmd == "build":
            cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in fields(WorldConfig)})
            s = build_world(cfg)
            print(f"wrote {cfg.out}/ in {time.time() - t0:.1f}s (seed {cfg.seed})")
            for name, n in s["splits"].items():
                print(f"  world/{name}.jsonl  {n} problems")
            print(f"  pretrain.jsonl  {s['pretrain_docs']} documents, {s['pretrain_mb']:.2f} MB "
                  f"({', '.join(f'{k} {v}' for k, v in s['pretrain_kinds'].items())}); "
                  f"pretrain_test.jsonl {s['pretrain_test']} problems")
            unit = "tokens" if s["tokenizer"] else "characters / whitespace words (no tokenizer: pass --tokenizer DIR)"
            for k in ("cot", "comt"):
                print(f"  {k}.jsonl  {s['splits']['train']} pairs, mean completion " +
                      " / ".join(f"{v:.1f}" for v in s[k].values()) + f" {unit}")
            print(f"  paper: ~255 (CoT) vs ~133 (CoMT) tokens; here CoMT/CoT = "
                  f"{next(iter(s['comt'].values())) / next(iter(s['cot'].values())):.2f}")
        elif args.cmd == "teach":
            cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in fields(TeacherConfig)})
            s = teach(cfg)
            print(f"{cfg.teacher} teacher ({cfg.kind}) -> {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
        else:
            problems, skipped = convert(args.format, args.inp)
            write_jsonl(args.out, problems)
            print(f"{args.format}: {len(problems)} problems -> {args.out}"
                  + (f" ({skipped} skipped: answer not a number)" if skipped else ""))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
