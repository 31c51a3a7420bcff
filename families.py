"""families.py: the problem families of the embedded world, the task the student learns.

A family is a kind of word problem: it draws people, objects and numbers, builds the problem's
computation graph (givens and steps, every value an exact integer) and phrases the question in one of
3-4 ways. world.py draws the splits from these families, writes their texts (CoT, plan, execution) and
builds data/; nothing here is run on its own.

  14 task families   shopping, sharing, rates (journey), percentages, discounts, ages, recipes, wages,
                     savings, garden, bus, packing, schedules, collections: 2-4 steps in train and
                     test_id; DEEP_FAMILIES grow to 5-8 steps (ood_deep), TABLE_FAMILIES give their facts
                     as a table (ood_table); amounts (prices, sizes, distances) scale x100-1000 (ood_hard)
  4 novel families   coins, fence, teams, library: stories, graph shapes and question-first phrasings
                     the task families never use (ood_novel, like AsDiv / MAWPS)
  two entity pools   pool 0 for every split but ood_symbolic, pool 1 (disjoint names and objects) for
                     ood_symbolic (GSM-Symbolic: train templates, renamed entities, new numbers)
The base families of the pretraining corpus, disjoint from all of these, are in world.py.
"""
import re


# ---------------------------------------------------------------------------------------------
# Computation graphs
# ---------------------------------------------------------------------------------------------
class Resample(Exception):
    """The sampled numbers break a rule (inexact division, negative, too large): draw again."""


class Graph:
    """Givens and steps of one problem: givens in [0, limit], every step's value an integer in
    [1, limit] (exact divisions, no negative or zero result); a broken rule means draw again."""

    def __init__(self, limit: int):
        self.limit, self.givens, self.steps, self.v = limit, [], [], {}

    def given(self, var, value, desc):
        if value < 0 or value > self.limit:
            raise Resample
        assert var not in self.v, var
        self.givens.append([var, value, desc])
        self.v[var] = value
        return var

    def step(self, var, a, op, b, desc):
        x, y = self.v[a], self.v[b]
        if op == "/" and (y == 0 or x % y):
            raise Resample
        r = apply_op(op, x, y)
        if r <= 0 or r > self.limit:
            raise Resample
        assert var not in self.v, var
        self.steps.append([var, a, op, b, desc])
        self.v[var] = r
        return var

    def program(self):
        return {"givens": [list(g) for g in self.givens], "steps": [list(s) for s in self.steps]}


def apply_op(op, x, y):
    return {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]


# ---------------------------------------------------------------------------------------------
# Entities and what a family draws from
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


def cap(s):
    return s[:1].upper() + s[1:]


def join_and(xs):
    """'a', 'a and b', 'a, b and c'."""
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


class Person:
    def __init__(self, name, he):
        self.name, self.he, self.He = name, he, cap(he)
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
    buys = join_and([f"{v[_var(pl)]} {pl}" for s, pl in items])
    each = join_and([f"{v[_var(pl)]} {pl} for {v[_var(s) + '_price']} dollars each" for s, pl in items])
    costs = join_and([f"{_a(s)} costs {v[_var(s) + '_price']} dollars" for s, pl in items])
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
    per = join_and([f"{v[_var(x) + '_per_batch']} cups of {x}" for x in ings])
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
        raise Resample
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


# ---------------------------------------------------------------------------------------------
# Drawing a problem
# ---------------------------------------------------------------------------------------------
def sample(fn, rng, **kw):
    """One valid draw of a family: (question, graph, ctx). Rejection-samples the numbers."""
    for _ in range(5000):
        c = Ctx(rng, **kw)
        g = Graph(c.limit)
        try:
            q = fn(c, g)
        except Resample:
            continue
        return q, g, c
    raise RuntimeError(f"{fn.__name__}: no valid draw in 5000 tries")
