import math
import random

import pytest
import torch

from confidence import (ComputedNumber, ConfidenceError, NumberSpan, ccrl_reward, ccrl_reward_from_rollout,
                        computed_numbers, confidence, gold_values, is_counter, number_is_correct, number_spans,
                        number_token_spans, outcome_score, question_values, score_computed_numbers)
from ppo import entropy_from_logits


def nums(text, **kw):
    return [(text[s:e], v) for s, e, v in number_spans(text, **kw)]


# ----------------------------------------------------------------------------- number spans in text

def test_number_spans_separators_and_decimals():
    assert nums("He paid $1,234.50 for 3 items, 12,345,678 in all") == [
        ("1,234.50", 1234.5), ("3", 3.0), ("12,345,678", 12345678.0)]
    assert nums("a list 1,2,3 and 1,2345") == [("1", 1.0), ("2", 2.0), ("3", 3.0), ("1", 1.0), ("2345", 2345.0)]
    assert nums("costs $.50, or .5 dollars; 0.25") == [(".50", 0.5), (".5", 0.5), ("0.25", 0.25)]
    assert nums("The answer is 42.") == [("42", 42.0)]  # the full stop is not a decimal point
    assert nums("20% of 50 is 10.5%") == [("20", 20.0), ("50", 50.0), ("10.5", 10.5)]


def test_number_spans_sign_versus_subtraction():
    assert nums("5 - 3 = 2") == [("5", 5.0), ("3", 3.0), ("2", 2.0)]
    assert nums("5-3 and x-3 and a 10-year loan") == [("5", 5.0), ("3", 3.0), ("3", 3.0), ("10", 10.0)]
    assert nums("5 -3 and (5) -3") == [("5", 5.0), ("3", 3.0), ("5", 5.0), ("3", 3.0)]
    assert nums("-7 degrees, it fell to -7, x = -7, (-7), 3*-2, 4 - -1") == [
        ("-7", -7.0), ("-7", -7.0), ("-7", -7.0), ("-7", -7.0), ("3", 3.0), ("-2", -2.0), ("4", 4.0), ("-1", -1.0)]
    assert nums("x = \u22124") == [("\u22124", -4.0)]


def test_number_spans_identifiers_and_fractions():
    assert nums("x2 + per_bag2 = 10, bag_3 and 2_b, x_2.5, v1.2.3") == [("10", 10.0)]
    assert nums("3rd day, 5kg") == [("3", 3.0), ("5", 5.0)]  # suffixes do not hide a number
    assert nums("3/4 of 48/2") == [("3", 3.0), ("4", 4.0), ("48", 48.0), ("2", 2.0)]
    assert nums("3/4 of the cake, 48/2=24, 1/0, 1/2/3", fractions=True) == [
        ("3/4", 0.75), ("48", 48.0), ("2", 2.0), ("24", 24.0), ("1", 1.0), ("0", 0.0),
        ("1", 1.0), ("2", 2.0), ("3", 3.0)]


def test_counters():
    text = "Step 1: add. step #2 too\n1. Compute 5\n  2) then 7. On the 3rd day, 31.\n4.5 kg\n(3) Add 6\n(8) + 2"
    found = [(text[s:e], is_counter(text, s, e)) for s, e, _ in number_spans(text)]
    assert found == [("1", True), ("2", True), ("1", True), ("5", False), ("2", True), ("7", False),
                     ("3", True), ("31", False), ("4.5", False), ("3", True), ("6", False), ("8", False),
                     ("2", False)]


def test_question_values():
    q = "Twenty-five kids share a dozen eggs; half of them eat 3 each, 20% more, thrice"
    vals = question_values(q)
    for v in (25, 20, 5, 12, 2, 0.5, 3, 100):
        assert any(math.isclose(v, u) for u in vals), v
    assert not any(math.isclose(7, u) for u in vals)
    assert question_values("no numbers here") == []
    # What GSM8K questions write besides plain numbers: a fraction, a mixed number, a percentage, a scale word
    # each state their value, so a response that uses 0.75, 1.5, 0.25 or 300 has not computed it.
    cases = {"3/4 of 80 apples": [0.75, 3, 4, 80], "He ate 1 1/2 pies": [0.5, 1, 1.5, 2],
             "25% of 80": [0.25, 25, 80, 100], "10 percent of 7": [0.1, 7, 10, 100],
             "three hundred apples and 2.5 million pears": [2.5, 3, 100, 300, 1e6, 2.5e6],
             "twenty-five hundred": [5, 20, 25, 100, 2500], "x2 and 3/4/5 and 7-3": [3, 4, 5, 7, 3]}
    for q, expected in cases.items():
        assert sorted(set(question_values(q))) == sorted(set(map(float, expected))), q
    resp = [NumberSpan(0, 0, v, str(v)) for v in (0.75, 60.0, 1.5, 300.0)]
    assert [s.value for s in computed_numbers("3/4 of 80 apples, 1 1/2 pies, three hundred pears", resp)] == [60.0]


# ----------------------------------------------------------------------------- numbers on tokens

def test_number_token_spans_multi_token_numbers():
    toks = ["Step", " 1", ":", " 1", ",", "2", "3", "4", ".", "5", " -", " 7", "."]
    spans = number_token_spans(toks)
    assert [(s.start_tok, s.end_tok, s.value, s.text, s.counter) for s in spans] == [
        (1, 1, 1.0, "1", True), (3, 9, 1234.5, "1,234.5", False), (11, 11, 7.0, "7", False)]
    # a token can hold the end of one number and the start of the next text
    spans = number_token_spans(["x", "=-", "12", "3.", "5 apples"])
    assert [(s.start_tok, s.end_tok, s.value) for s in spans] == [(1, 4, -123.5)]


def test_number_token_spans_split_utf8():
    # "€5 and 6": the euro sign's three bytes are split over two byte-level tokens
    as_bytes = [b"\xe2\x82", b"\xac", b"5", b" and", b" 6"]
    spans = number_token_spans(as_bytes)
    assert [(s.start_tok, s.end_tok, s.value, s.text) for s in spans] == [(2, 2, 5.0, "5"), (4, 4, 6.0, "6")]
    # the same tokens decoded one by one (each half of the euro sign becomes U+FFFD)
    as_str = [t.decode("utf-8", "replace") for t in as_bytes]
    assert as_str[0] == "\ufffd"
    spans = number_token_spans(as_str)
    assert [(s.start_tok, s.end_tok, s.value) for s in spans] == [(2, 2, 5.0), (4, 4, 6.0)]
    # "é" split, then digits glued to it: an identifier-like letter only when decodable
    spans = number_token_spans([b"caf", b"\xc3", b"\xa9", b"2", b" 3"])
    assert [(s.start_tok, s.value) for s in spans] == [(4, 3.0)]
    spans = number_token_spans(["caf", "\ufffd", "\ufffd", "2", " 3"])  # the documented difference
    assert [(s.start_tok, s.value) for s in spans] == [(3, 2.0), (4, 3.0)]
    with pytest.raises(ConfidenceError):
        number_token_spans(["a", b"b"])


def test_number_token_spans_any_tokenisation():
    """Whatever the split into tokens (bytes, or each token decoded alone), every number lands on the
    tokens that hold its first and last byte."""
    rng = random.Random(0)
    alphabet = list("0123456789") * 3 + list(",.-  x_=()%$") + ["\u00e9", "\u20ac", "\n", "Step "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        raw = text.encode()
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 12)))) if len(raw) > 1 else []
        toks = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
        ends = [sum(len(t) for t in toks[:i + 1]) for i in range(len(toks))]  # byte end of each token

        def tok_at(byte):
            return next(i for i, e in enumerate(ends) if byte < e)

        want = [(tok_at(len(text[:s].encode())), tok_at(len(text[:e].encode()) - 1), v, text[s:e])
                for s, e, v in number_spans(text)]
        got = [(n.start_tok, n.end_tok, n.value, n.text) for n in number_token_spans(toks)]
        assert got == want, (text, toks)
        # decoded one by one: the same, unless a letter split between tokens sat right before digits
        # (then "\ufffd\ufffd6" reads 6 where "é6" is an identifier; see test_number_token_spans_split_utf8)
        try:
            as_str = [t.decode("utf-8") for t in toks]
        except UnicodeDecodeError:
            continue
        assert [(n.start_tok, n.end_tok, n.value, n.text) for n in number_token_spans(as_str)] == want


def test_computed_numbers_rules():
    q = "Tom has 3 boxes of 12 apples and fifteen pears. He eats 5."
    text = "Step 1: 3*12=36, 36+15.0=51, 51-5=46, so 46."
    spans = number_token_spans(list(text))  # one character per token
    got = [(s.text, s.start_tok) for s in computed_numbers(q, spans)]
    assert got == [("36", 13), ("51", 25), ("46", 34)]  # 15.0 is "fifteen"; copies dropped
    assert [text.index("=36"), text.index("=51"), text.index("=46")] == [12, 24, 33]
    got = [s.text for s in computed_numbers(q, spans, dedupe=False)]
    assert got == ["36", "36", "51", "51", "46", "46"]


# ----------------------------------------------------------------------------- confidence, correctness

def test_confidence_formulas_against_hand_values():
    V = 16
    for k in (1, 2, 5, 16):
        logits = torch.full((1, 3, V), -1e4)
        logits[..., :k] = 0.0  # uniform over k tokens at every position
        h = entropy_from_logits(logits)[0].tolist()
        assert confidence(h) == pytest.approx(1.0 / k, rel=1e-5)
        assert confidence(h, vocab_size=V, kind="norm") == pytest.approx(1 - math.log(k) / math.log(V), abs=1e-6)
    assert confidence([0.0, 0.0]) == 1.0  # one-hot
    assert confidence([0.0], vocab_size=V, kind="norm") == 1.0
    assert confidence([0.1, 0.3]) == pytest.approx(math.exp(-0.2))  # mean over the number's tokens
    assert confidence([math.log(2)], vocab_size=4096, kind="norm") == pytest.approx(0.9167, abs=1e-4)
    assert confidence([-1e-7]) == 1.0
    for bad in (dict(entropies=[]), dict(entropies=[0.1], kind="norm"), dict(entropies=[0.1], kind="min")):
        with pytest.raises(ConfidenceError):
            confidence(**bad)


def test_correctness_and_gold_values():
    assert gold_values(["1,234", "$5", "-7", 12.5, "12.5%", 3, "3/4"]) == [1234.0, 5.0, -7.0, 12.5, 12.5, 3.0, 0.75]
    for bad in ("many", "", "3 and 4"):
        with pytest.raises(ConfidenceError):
            gold_values([bad])
    assert number_is_correct(0.1 + 0.2, [0.3])
    assert number_is_correct(15.0, [15])
    assert not number_is_correct(33.33, [100 / 3])
    assert not number_is_correct(0.0, [1e-3])
    assert outcome_score(True, True) == 1.0 and outcome_score(False, True) == 0.0
    assert outcome_score(None, True) == -1.0 and outcome_score(True, False) == -1.0
    assert outcome_score(None, True, penalty=-0.5) == -0.5


# ----------------------------------------------------------------------------- the reward

def test_ccrl_reward_core_hand_tensor():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    numbers = [[ComputedNumber(36.0, "36", 0, 1, True, 0.8), ComputedNumber(30.0, "30", 2, 3, False, 0.5)],
               [ComputedNumber(7.0, "7", 5, 5, False, 0.9)]]
    scores, breakdown = ccrl_reward(numbers, [0.0, 1.0], mask, alpha=0.1, beta=0.3)
    expected = torch.tensor([[0, 0.08, 0, -0.15, 0, 0], [0, 0, 0, 0, 0, 1 - 0.27]])
    assert torch.allclose(scores, expected)
    assert breakdown[0] == {"outcome": 0.0, "confidence_bonus": pytest.approx(-0.07), "n_computed": 2,
                            "n_correct": 1}
    assert breakdown[1]["n_computed"] == 1 and breakdown[1]["n_correct"] == 0
    off, _ = ccrl_reward(numbers, [0.0, 1.0], mask, alpha=0.0, beta=0.0)  # outcome only
    assert off.tolist() == [[0.0] * 6, [0.0] * 5 + [1.0]]
    for a, b in ((0.2, 0.2), (0.3, 0.2), (-0.1, 0.2)):
        with pytest.raises(ConfidenceError):
            ccrl_reward(numbers, [0.0, 1.0], mask, alpha=a, beta=b)
    with pytest.raises(ConfidenceError):  # a number on a padding position
        ccrl_reward([[ComputedNumber(1.0, "1", 5, 5, True, 1.0)], []], [0.0, 0.0], mask)


QUESTION = "Tom has 3 boxes of 12 apples. He eats 5 of them. How many are left?"
GOLD = ["31", "36"]  # answer, then intermediates


def test_worked_example_of_the_docstring():
    toks = list("3 * 12 = 36. 36 - 5 = 30. The answer is 30.")
    ent = [0.0] * len(toks)
    i36, i30 = toks.index("6") - 1, "".join(toks).index("30")
    ent[i36], ent[i36 + 1], ent[i30], ent[i30 + 1] = 0.1, 0.3, 0.0, 0.4
    found = score_computed_numbers(toks, ent, QUESTION, GOLD)
    assert [(n.text, n.start_tok, n.end_tok, n.correct) for n in found] == [
        ("36", i36, i36 + 1, True), ("30", i30, i30 + 1, False)]
    assert 0.1 * found[0].confidence == pytest.approx(0.0819, abs=1e-4)
    assert -0.2 * found[1].confidence == pytest.approx(-0.1637, abs=1e-4)


def test_ccrl_reward_from_rollout_equals_hand_computation():
    EOS, PAD = "<eos>", "<pad>"
    rows = [
        # wrong answer, finished; "Step 1" is a counter; 36 right, 30 wrong, later mentions are copies
        (["Step", " 1", ":", " 3", " *", " 1", "2", " =", " 3", "6", ".", " 3", "6", " -", " 5", " =", " 3", "0",
          ".", " The answer is", " 3", "0", ".", EOS], 0),
        # right answer; 1,234.5 spans seven tokens and is wrong
        ([" 3", " *", " 12", " =", " 3", "6", " and", " 1", ",", "2", "3", "4", ".", "5", " -", " 3", "6", " =",
          " 3", "1", ".", " The answer is", " 31", ".", EOS], 0),
        # truncated: no EOS, no answer; the trailing 3 is in the question
        ([" 3", " *", " 12", " =", " 3", "7", ".", " 3", "7", " -", " 5", " =", " 3"], 0),
        # finished without an answer line; two prompt tokens "9", "9" sit before the response (masked)
        (["9", "9", " 3", " *", " 12", " =", " 3", "6", ".", EOS], 2),
    ]
    T = max(len(r) for r, _ in rows)
    vocab = sorted({t for r, _ in rows for t in r} | {PAD})
    ids = {t: i for i, t in enumerate(vocab)}
    B = len(rows)
    tokens = torch.full((B, T), ids[PAD])
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (r, start) in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor([ids[t] for t in r])
        mask[b, start:len(r)] = 1
    gen = torch.Generator().manual_seed(0)
    ent = torch.rand(B, T, generator=gen) * 3
    ent[mask == 0] = float("nan")  # entropies off the response must never be read

    scores, breakdown, numbers = ccrl_reward_from_rollout(
        tokens, mask, ent, [QUESTION] * B, [GOLD] * B, answer_correct=[False, True, None, None],
        finished=[True, True, False, True], decode_token=lambda i: vocab[i], stop_ids=[ids[EOS]],
        alpha=0.1, beta=0.25)

    def c(b, s, e):
        return math.exp(-sum(float(ent[b, t]) for t in range(s, e + 1)) / (e - s + 1))

    expected = torch.zeros(B, T)
    expected[0, 9] += 0.1 * c(0, 8, 9)  # 36, right
    expected[0, 17] -= 0.25 * c(0, 16, 17)  # 30, wrong
    expected[0, 23] += 0.0  # wrong answer
    expected[1, 5] += 0.1 * c(1, 4, 5)  # 36
    expected[1, 13] -= 0.25 * c(1, 7, 13)  # 1,234.5
    expected[1, 19] += 0.1 * c(1, 18, 19)  # 31, right
    expected[1, 24] += 1.0  # right answer
    expected[2, 5] -= 0.25 * c(2, 4, 5)  # 37, wrong
    expected[2, 12] += -1.0  # no EOS: penalty on the last token
    expected[3, 7] += 0.1 * c(3, 6, 7)  # 36
    expected[3, 9] += -1.0  # no answer: penalty on EOS
    assert torch.allclose(scores, expected, atol=1e-6)
    assert [[(n.text, n.start_tok, n.end_tok, n.correct) for n in row] for row in numbers] == [
        [("36", 8, 9, True), ("30", 16, 17, False)],
        [("36", 4, 5, True), ("1,234.5", 7, 13, False), ("31", 18, 19, True)],
        [("37", 4, 5, False)],
        [("36", 6, 7, True)]]
    assert [(d["outcome"], d["n_computed"], d["n_correct"]) for d in breakdown] == [
        (0.0, 2, 1), (1.0, 3, 2), (-1.0, 1, 0), (-1.0, 1, 1)]
    assert breakdown[1]["confidence_bonus"] == pytest.approx(0.1 * c(1, 4, 5) - 0.25 * c(1, 7, 13) + 0.1 * c(1, 18, 19))

    # the other confidence, 1 - mean H / log V, reaches the rewards the same way
    V = 50_000
    s_norm, _, n_norm = ccrl_reward_from_rollout(
        tokens, mask, ent, [QUESTION] * B, [GOLD] * B, [False, True, None, None], [True, True, False, True],
        lambda i: vocab[i], [ids[EOS]], alpha=0.1, beta=0.25, kind="norm", vocab_size=V)
    cn = lambda b, s, e: 1 - sum(float(ent[b, t]) for t in range(s, e + 1)) / (e - s + 1) / math.log(V)
    assert float(s_norm[1, 13]) == pytest.approx(-0.25 * cn(1, 7, 13), abs=1e-6)
    assert float(s_norm[0, 9]) == pytest.approx(0.1 * cn(0, 8, 9), abs=1e-6)
    assert [n.confidence for n in n_norm[3]] == pytest.approx([cn(3, 6, 7)])

    # bytes from decode_token give the same result; without dedupe the copies are scored too
    s2, _, _ = ccrl_reward_from_rollout(tokens, mask, ent, [QUESTION] * B, [GOLD] * B, [False, True, None, None],
                                        [True, True, False, True], lambda i: vocab[i].encode(), [ids[EOS]],
                                        alpha=0.1, beta=0.25)
    assert torch.equal(s2, scores)
    _, b3, _ = ccrl_reward_from_rollout(tokens, mask, ent, [QUESTION] * B, [GOLD] * B, [False, True, None, None],
                                        [True, True, False, True], lambda i: vocab[i], [ids[EOS]], dedupe=False)
    assert [d["n_computed"] for d in b3] == [4, 5, 2, 1]
    with pytest.raises(ConfidenceError):
        ccrl_reward_from_rollout(tokens, mask, ent[:, :5], [QUESTION] * B, [GOLD] * B, [None] * B, [True] * B,
                                 lambda i: vocab[i])
