"""world.py: the embedded synthetic world under data/, a pure function of --seed.

The paper fine-tunes pretrained students on GSM8K and tests them on its OOD cousins; here there are no
weights, so the default is a world of arithmetic word problems with known computation graphs, small
enough for a from-scratch student on two CPU cores. This file draws the ID and OOD splits from the
problem families (families.py), writes the texts of a computation graph (CoT, plan, execution; the
formats are data.py's), makes the base corpus that stands in for pretraining, and builds data/.

Run
    python world.py                     # the same as python data.py: data/ in seconds, on one core
    python world.py --out /tmp/w --seed 1 --n-train 2000     # flags mirror WorldConfig

What it writes
  data/world/train, test_id   the 14 task families, 3-4 phrasings each, 2-4 steps, random names,
                              objects and numbers
  data/world/ood_hard         the same, amounts (prices, sizes, distances) x 100-1000 (GSM-Hard)
  data/world/ood_deep         5 of the families with 5-8 steps
  data/world/ood_novel        4 families and phrasings never seen in train (AsDiv / MAWPS)
  data/world/ood_table        4 of the families with their facts in a table (TabMWP)
  data/world/ood_symbolic     train templates, renamed entities (a disjoint pool), new numbers (GSM-Symbolic)
  data/pretrain.jsonl         the base corpus, {"text"}: Question/Plan/Execution and Question/CoT documents
                              of 6 base families DISJOINT from the task families, plan-reading exercises
                              (a story of any family with a RANDOM plan over its quantities and its
                              execution: the story never says what to compute, only the plan does), binding
                              exercises ("Given: ...", a plan of formulas, its execution), arithmetic drills,
                              stories (a question and its facts, no solution). Two thirds of the exercises'
                              and stories' questions come from the task and novel families (never a split's
                              question): the base knows their words and how to read them, never a strategy
  data/pretrain_test.jsonl    held-out base-family problems, to measure the base skills
  data/cot.jsonl, comt.jsonl  the programmatic teacher's SFT pairs for train (data.py)
World problems are problems (data.py) with family, template, steps, entities and program (the
computation graph: givens [var, value, description], steps [var, a, op, b, description]).
Number ranges (a few-million-parameter model learns the format long before the arithmetic): ID counts
mostly 2-12 and amounts 1-150, every number of a question and of its steps <= 999 (--max-value);
ood_hard up to 999,000. The base corpus puts 30% (--base-big) of its problems and drill lines at ood_hard
magnitudes (drill operands up to 6 digits), so ood_hard tests the task, not unseen digits.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import data
from families import (DEEP_FAMILIES, NAMES, NOVEL_FAMILIES, ORD, TABLE_FAMILIES, TASK_FAMILIES, THINGS, Graph,
                      Resample, apply_op, cap, sample)


@dataclass
class WorldConfig:
    out: str = "data"              # output directory of the embedded default
    seed: int = 0                  # every file is a pure function of this seed and the sizes
    n_train: int = 6000            # training problems (cot.jsonl / comt.jsonl are made from these)
    n_test: int = 500              # in-distribution test problems
    n_ood: int = 500               # problems in each OOD split
    n_pretrain: int = 30000        # base-corpus documents (about 13 MB; the corpus base/ was trained on)
    n_pretrain_test: int = 500     # held-out base-family problems, to measure base skills
    max_value: int = 999           # largest number in an ID problem (question and every step)
    hard_min: int = 100            # ood_hard multiplies the amounts by a factor in [hard_min, hard_max]
    hard_max: int = 1000
    base_big: float = 0.3          # share of base-corpus problems and drills at ood_hard magnitudes
    tokenizer: str = ""            # tokenizer dir for token counts ("" = base/ when it exists)


SPLITS = ("train", "test_id", "ood_hard", "ood_deep", "ood_novel", "ood_table", "ood_symbolic")


# ---------------------------------------------------------------------------------------------
# The texts of a computation graph
# ---------------------------------------------------------------------------------------------
def program_values(program) -> dict:
    """Every variable's value: the givens, then each step in order."""
    v = {g[0]: g[1] for g in program["givens"]}
    for var, a, op, b, _ in program["steps"]:
        v[var] = apply_op(op, v[a], v[b])
    return v


def program_solution(program, annotate=True) -> str:
    """The worked solution: a sentence per step with its numbers (GSM8K annotations if annotate)."""
    v, desc = program_values(program), {g[0]: g[2] for g in program["givens"]}
    told, lines = set(), []
    for var, a, op, b, d in program["steps"]:
        intro = [f"{desc[x]} is {v[x]}" for x in dict.fromkeys((a, b)) if x in desc and x not in told]
        told.update((a, b))
        lead = cap(" and ".join(intro)) + ", so " + d if intro else cap(d)
        calc = f"{v[a]} {op} {v[b]}"
        ann = f"<<{v[a]}{op}{v[b]}={v[var]}>>" if annotate else ""
        lines.append(f"{lead} is {calc} = {ann}{v[var]}.")
    return "\n".join(lines + [f"The answer is {v[program['steps'][-1][0]]}."])


def program_plan(program) -> str:
    """The meta-thought: what each given is, then the strategy as formulas over names; no number.
    Ends with the hand-off after which the student executes. One "Let" line per given, in the order the
    execution binds them: a small student copies the k-th name into the k-th binding line far more
    reliably than it finds it inside one long sentence of definitions."""
    lines = (["Plan:"] + [f"Let {var} be {d}." for var, _, d in program["givens"]]
             + [f"{var} = {a} {op} {b}." for var, a, op, b, _ in program["steps"]])
    return "\n".join(lines + [f"The answer is {program['steps'][-1][0]}.", "Execution:", ""])


def program_execution(program) -> str:
    """What follows 'Execution:': bind each variable, then one line per step with the numbers."""
    v = program_values(program)
    lines = [f"{var} = {val}" for var, val, _ in program["givens"]]
    lines += [f"{var} = {a} {op} {b} = {v[a]} {op} {v[b]} = {v[var]}" for var, a, op, b, _ in program["steps"]]
    return "\n".join(lines + [f"The answer is {v[program['steps'][-1][0]]}."])


# ---------------------------------------------------------------------------------------------
# Base families: the stand-in for pretraining
# ---------------------------------------------------------------------------------------------
# Drawn like the task families (families.sample), for data/pretrain.jsonl. Disjoint from every task and
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
        lines.append(f"{a} {op} {b} = {apply_op(op, a, b)}")
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
                except Resample:
                    pass
        if g.steps:
            break
    prog = g.program()
    given = ", ".join(f"{var} = {val}" for var, val, _ in prog["givens"])
    plan = "\n".join(f"{var} = {a} {op} {b}." for var, a, op, b, _ in prog["steps"])
    return (f"Given: {given}.\nPlan:\n{plan}\nThe answer is {prog['steps'][-1][0]}.\nExecution:\n"
            + program_execution(prog))


def random_plan(rng, givens, names, limit):
    """A plan over a story's quantities that the story does not suggest: 1-4 steps of random operations,
    each step a new name from names. The givens are [var, value, desc]. Returns a program or None."""
    for _ in range(50):
        g, unused = Graph(limit), [var for var, _, _ in givens]
        for var, val, d in givens:
            g.given(var, val, d)
        for w in rng.sample([n for n in names if n not in g.v], rng.randint(1, 4)):
            for _ in range(30):
                # Like a written plan: mostly the last result with a quantity not used yet.
                a = g.steps[-1][0] if g.steps and rng.random() < 0.7 else rng.choice(unused or list(g.v))
                b = rng.choice([x for x in (unused if rng.random() < 0.7 else list(g.v)) if x != a] or
                               [x for x in g.v if x != a])
                swap = rng.random() >= 0.6                  # either order: not always "result op given"
                op = rng.choice("+-*/")
                x, y = (b, a) if swap else (a, b)
                try:
                    g.step(w, x, op, y, "")
                except Resample:
                    continue
                unused = [u for u in unused if u not in (x, y)]
                break
        if g.steps:
            return g.program()
    return None


def exercise_doc(rng, cfg, question: str, prog: dict, names) -> str | None:
    """A story of any family with a random plan over its quantities, and the plan's execution. The story
    does not determine the computation, only the plan does, so the student learns to read a plan: the
    skill CoMT leaves to the base model. Half the documents also rename the quantities to arbitrary
    words (the names must be copied from the Let line) and half shuffle their order."""
    givens = [list(x) for x in prog["givens"]]
    if rng.random() < 0.5:
        rng.shuffle(givens)
    if rng.random() < 0.5:
        new = rng.sample([n for n in names if n not in {v for v, _, _ in givens}], len(givens))
        givens = [[w, val, d] for w, (_, val, d) in zip(new, givens)]
    plan = random_plan(rng, givens, names, max(cfg.max_value, *(val for _, val, _ in givens)))
    if plan is None:
        return None
    return plan_doc(question, plan)


def plan_doc(question: str, program: dict) -> str:
    """A question, its plan and the plan's execution: what a CoMT student writes, end to end."""
    return f"Question: {question}\n{program_plan(program)}{program_execution(program)}"


def story_doc(rng, question: str, prog: dict) -> str:
    facts = [f"{cap(d)} is {val}." for _, val, d in prog["givens"]]
    rng.shuffle(facts)
    return f"Story: {question}\nFacts:\n" + "\n".join(facts)


def world_story(rng, cfg: WorldConfig):
    """A question of a task or novel family read as a story: the words a pretrained student knows, with
    no plan, solution or answer. Both name and object pools, so ood_symbolic's names are not new words."""
    fams = {**TASK_FAMILIES, **NOVEL_FAMILIES}
    q, g, _ = sample(fams[rng.choice(sorted(fams))], rng, limit=cfg.max_value, **_ALL)
    return q, g.program()


def pretrain_corpus(cfg: WorldConfig, exclude=()):
    """The base corpus: {"text"} documents of six kinds. Returns (texts, counts per kind). No question
    in exclude (the splits' and the held-out base problems') appears."""
    rng = random.Random(f"{cfg.seed}/pretrain")
    kinds = {"plan": 0.15, "exercise": 0.4, "cot": 0.1, "binding": 0.15, "drill": 0.15, "story": 0.05}
    texts, counts, exclude = [], dict.fromkeys(kinds, 0), set(exclude)
    names = list(BINDING_WORDS)    # exercises' names: these and every variable name met so far, in order
    while len(texts) < cfg.n_pretrain:
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        if kind == "drill":
            text = drill_doc(rng, cfg)
        elif kind == "binding":
            text = binding_doc(rng, cfg)
        elif kind in ("story", "exercise") and rng.random() < 2 / 3:
            q, prog = world_story(rng, cfg)
            if q in exclude:
                continue
            text = story_doc(rng, q, prog) if kind == "story" else exercise_doc(rng, cfg, q, prog, names)
        else:
            p = base_problem(rng, cfg)
            if p["question"] in exclude:
                continue
            q, prog = p["question"], p["program"]
            if kind == "plan":
                text = plan_doc(q, prog)
            elif kind == "cot":
                text = f"Question: {q}\n{program_solution(prog, annotate=False)}"
            elif kind == "exercise":
                text = exercise_doc(rng, cfg, q, prog, names)
            else:
                text = story_doc(rng, q, prog)
        if kind == "exercise":
            names += [x[0] for x in prog["givens"] + prog["steps"] if x[0] not in names]
            if text is None:
                continue
        texts.append(text)
        counts[kind] += 1
    return texts, counts


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
            raise data.DataError(f"--tokenizer {tokenizer_dir}: {e}") from None
        return {"tokens": sum(len(tok.encode(t)) for t in texts) / n}
    return {"chars": sum(map(len, texts)) / n, "words": sum(len(t.split()) for t in texts) / n}


def build_world(cfg: WorldConfig) -> dict:
    """Everything under cfg.out: world splits, base corpus (+ held-out base problems), SFT sets."""
    for name in ("n_train", "n_test", "n_ood", "n_pretrain", "n_pretrain_test"):
        if getattr(cfg, name) < 1:
            raise data.DataError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive integer")
    if not 1 <= cfg.hard_min <= cfg.hard_max:
        raise data.DataError(f"--hard-min {cfg.hard_min} --hard-max {cfg.hard_max}: expected 1 <= hard_min <= hard_max")
    if cfg.max_value < 100 or not 0 <= cfg.base_big <= 1:
        raise data.DataError(f"--max-value {cfg.max_value} --base-big {cfg.base_big}: expected max_value >= 100 "
                             f"and base_big in [0, 1]")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise data.DataError(f"--out {out}: exists and is not a directory; expected the directory to build into")
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
    texts, kinds = pretrain_corpus(cfg, exclude={p["question"] for rows in splits.values() for p in rows} | asked)
    cot = [data.sft_pair(p, data.programmatic_teacher(p, "cot"), "cot") for p in splits["train"]]
    comt = [data.sft_pair(p, data.programmatic_teacher(p, "comt"), "comt") for p in splits["train"]]
    for name, rows in splits.items():
        data.write_jsonl(out / "world" / f"{name}.jsonl", rows)
    data.write_jsonl(out / "pretrain.jsonl", [{"text": t} for t in texts])
    data.write_jsonl(out / "pretrain_test.jsonl", held)
    data.write_jsonl(out / "cot.jsonl", cot)
    data.write_jsonl(out / "comt.jsonl", comt)
    tok = cfg.tokenizer or ("base" if Path("base").is_dir() else "")
    return {"splits": {k: len(v) for k, v in splits.items()}, "pretrain_docs": len(texts), "pretrain_kinds": kinds,
            "pretrain_mb": sum(len(t.encode()) for t in texts) / 1e6, "pretrain_test": len(held),
            "cot": length_stats([r["completion"] for r in cot], tok),
            "comt": length_stats([r["completion"] for r in comt], tok),
            "tokenizer": tok or None}


def summary(cfg: WorldConfig, s: dict, seconds: float) -> str:
    """What build_world wrote (its returned dict s), as the command line reports it."""
    unit = "tokens" if s["tokenizer"] else "characters / whitespace words (no tokenizer: pass --tokenizer DIR)"
    kinds = ", ".join(f"{k} {v}" for k, v in s["pretrain_kinds"].items())
    return "\n".join(
        [f"wrote {cfg.out}/ in {seconds:.1f}s (seed {cfg.seed})"]
        + [f"  world/{name}.jsonl  {n} problems" for name, n in s["splits"].items()]
        + [f"  pretrain.jsonl  {s['pretrain_docs']} documents, {s['pretrain_mb']:.2f} MB ({kinds}); "
           f"pretrain_test.jsonl {s['pretrain_test']} problems"]
        + [f"  {k}.jsonl  {s['splits']['train']} pairs, mean completion "
           + " / ".join(f"{v:.1f}" for v in s[k].values()) + f" {unit}" for k in ("cot", "comt")]
        + [f"  paper: ~255 (CoT) vs ~133 (CoMT) tokens; here CoMT/CoT = "
           f"{next(iter(s['comt'].values())) / next(iter(s['cot'].values())):.2f}"])


if __name__ == "__main__":   # python world.py [flags] is python data.py build [flags]: one CLI, in data.py
    sys.exit(data.main(["build"] + sys.argv[1:]))
