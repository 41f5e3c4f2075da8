"""ROUGE-L near-duplicate filter vs the real rouge-score package (the stanford_alpaca reference)."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, scoring, tokenize

from instructflow.tasks.rouge import (NearDuplicateFilter, Verdict, lcs_length, rouge_l_f, rouge_tokens,
                                      unicode_tokens)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_tokens(text: str) -> list[str]:
    return tokenize.tokenize(text, None)


def reference_f(candidate: list[str], pool_entry: list[str]) -> float:
    """stanford_alpaca: partial(rouge_scorer._score_lcs, new_instruction_tokens)(pool_tokens)."""
    return rouge_scorer._score_lcs(candidate, pool_entry).fmeasure


def reference_filter(texts: list[str], threshold: float = 0.7, top_k: int = 10, seeds: list[str] = ()):
    """Brute force: every candidate against the whole pool. Pool ids: seeds are ("seed", i), the
    stream items are their index. Top-k: scores > 0, best first, ties -> earliest added."""
    pool: list[tuple[object, list[str]]] = [(("seed", i), reference_tokens(t)) for i, t in enumerate(seeds)]
    verdicts = []
    for index, text in enumerate(texts):
        tokens = reference_tokens(text)
        scores = [reference_f(tokens, other) for _, other in pool]
        best = max(scores, default=0.0)
        ranked = sorted((-s, order) for order, s in enumerate(scores) if s > 0)[:top_k]
        verdicts.append(Verdict(kept=best <= threshold, max_score=best,
                                most_similar_id=pool[scores.index(best)][0] if best > 0 else None,
                                top_k=[(pool[order][0], -s) for s, order in ranked],
                                mean_score=float(np.mean(scores)) if scores else None))
        if best <= threshold:
            pool.append((index, tokens))
    return verdicts


def assert_same(ours: list[Verdict], reference: list[Verdict], top_k: int = 10, with_mean: bool = False):
    for index, (got, want) in enumerate(zip(ours, reference, strict=True)):
        assert (got.kept, got.max_score, got.most_similar_id) == \
            (want.kept, want.max_score, want.most_similar_id), index
        assert got.top_k == want.top_k[:top_k], index
        assert got.mean_score == (want.mean_score if with_mean else None), index


# ----------------------------------------------------------------------------- tokenizer + scorer

QUIRKY_CHARS = list("abcxyz ABC019 .,;:!?'\"-_/\n\t") + ["é", "ß", "İ", "\u212a", "\u0301", "ﬁ", "中", "😀",
                                                         "\u00a0"]


@SETTINGS
@given(st.one_of(st.text(), st.text(alphabet=st.sampled_from(QUIRKY_CHARS))))
def test_rouge_tokens_match_rouge_score(text):
    assert rouge_tokens(text) == reference_tokens(text)


def test_rouge_tokens_quirks_are_the_references():
    assert rouge_tokens("Caf\u00e9 au lait!") == ["caf", "au", "lait"]    # precomposed é vanishes ...
    assert rouge_tokens("Cafe\u0301 au lait!") == ["cafe", "au", "lait"]   # ... a combining accent just drops out
    assert rouge_tokens("写一首关于秋天的诗。") == []
    assert rouge_tokens("It's 3.5\u00a0km") == ["it", "s", "3", "5", "km"]
    assert rouge_tokens("\u212aelvin") == ["kelvin"]  # KELVIN SIGN lower()s to ASCII k


TOKEN_LISTS = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "the", "1"]), max_size=40)


@SETTINGS
@given(TOKEN_LISTS, TOKEN_LISTS)
def test_rouge_l_f_is_bit_identical_to_score_lcs(a, b):
    want = reference_f(a, b)
    assert rouge_l_f(a, b) == want
    assert rouge_l_f(b, a) == want
    assert lcs_length(a, b) == rouge_scorer._lcs_table(a, b)[-1][-1]


def test_rouge_l_f_long_sequences_use_python_ints_correctly():
    rng = random.Random(7)
    for _ in range(20):
        a = [rng.choice("abcdefgh") for _ in range(rng.randint(60, 200))]
        b = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 200))]
        assert rouge_l_f(a, b) == reference_f(a, b)


def rouge_score_rouge_l(target: str, prediction: str) -> tuple[float, float, float]:
    """(precision, recall, F) from our tokenizer + LCS, in rouge_score.score(target, prediction) terms."""
    t, p = rouge_tokens(target), rouge_tokens(prediction)
    lcs = lcs_length(t, p)
    return lcs / len(p), lcs / len(t), rouge_l_f(t, p)


# rouge-score's own test data (google-research/rouge testdata/target.txt and prediction.txt, first
# lines); the expected values in rouge_scorer_test.py come from manual runs of ROUGE-1.5.5.
TARGETS = [
    "ZfbCUIUuePaiLVUlCaUXxkpu XPeWing tUHfPMuZ',-Xd Y BrUgVJing M-HV.-DgdDaY.rFDJCRing Ht-LM EKBDXkME,yz'RBr "
    "q'wtion wIojNbN wL,b .a-'XdQggyFl jB-RPP'iyOIcUxer tKM L\n",
    "KsJdPByEtAor fE-Qg Dpdbring cw-WeFyu vC MoBL Xdn g wkvcEiGvKtion BDFhrpMtion psing sbKao Q m qiing "
    "LMmer HqqLFXe,XPY,J XsurkMer ,ed nB'wH'bWVHjWFEing tQ.saefZwJtKrTlixYpMMsJing UCAPwNHeYVjDing c T "
    "BUySKtion gMPfJpwGw p'NvxAoping eu pBwMBKV'I DNxqelhu,PHPxDEq,mtion SN\n",
]
PREDICTIONS = [
    "rFDJCRtion Ht-LM EKtDXkME,yz'RBr q'wer wrojNbN wL,b .a-'XdQggyFl jB-RPP'iyOIcUxi\n",
    "n cw-WeFyu vC MoBL Xdn g wkvcEiGvKtion BDFhrpMer pstion sbKao Q m qier LMmed HqqLFXe,XPY,J XsurkMeo ,ed "
    "nB'wH'bWVHjWFEer tQ.saefZwJtKrTlixYpMMNJtion UCAPwNHeYVjD\n",
]


def test_rouge_score_test_suite_rouge_l_cases():
    # testRougeLConsecutive / testRougeLNonConsecutive
    for prediction in ("testing one", "testing two"):
        precision, recall, f = rouge_score_rouge_l("testing one two", prediction)
        assert (precision, recall) == pytest.approx((1, 2 / 3)) and f == pytest.approx(4 / 5)
    # testRougeAllMulti: the best of several targets
    assert max(rouge_l_f(rouge_tokens(t), rouge_tokens("text first")) for t in ("first text", "first something")) \
        == pytest.approx(0.5)
    # testRougeEmpty
    assert rouge_l_f(rouge_tokens("testing one two"), rouge_tokens("")) == 0.0
    # testLcsTable
    assert lcs_length([1, 2, 3, 4, 5], [2, 5, 3, 4]) == 3
    assert lcs_length([1, 2, 3, 4, 5], [8, 9]) == 0
    # testRougeLAgainstRouge155
    for target, prediction, (recall, precision, f) in zip(TARGETS, PREDICTIONS, [(0.40741, 0.68750, 0.51163),
                                                                                    (0.40476, 0.65385, 0.50000)]):
        got_precision, got_recall, got_f = rouge_score_rouge_l(target, prediction)
        assert (got_recall, got_precision, got_f) == pytest.approx((recall, precision, f), abs=5e-6)


def boundary_cases(max_len: int):
    """All (L, m, n) whose F is exactly 7/10 in rationals: 20 L = 7 (m + n)."""
    for m in range(1, max_len + 1):
        for n in range(1, max_len + 1):
            if 7 * (m + n) % 20 == 0 and 1 <= 7 * (m + n) // 20 <= min(m, n):
                yield 7 * (m + n) // 20, m, n


def test_exact_point_seven_cases_follow_the_reference_float():
    cases = list(boundary_cases(150))
    above = sum(scoring.fmeasure(lcs / m, lcs / n) > 0.7 for lcs, m, n in cases)
    assert (len(cases), above) == (531, 272)   # the count: F is not 2L/(m+n)
    assert reference_f(list("abcdefg"), list("abcdefghijklm")) == 0.7000000000000001   # L=7, m=7, n=13
    verdicts = set()
    for lcs, m, n in boundary_cases(45):
        shared = [f"w{i}" for i in range(lcs)]
        candidate = " ".join(shared + [f"c{i}" for i in range(m - lcs)])
        pool_entry = " ".join(shared + [f"p{i}" for i in range(n - lcs)])
        near_dup = NearDuplicateFilter()
        near_dup.add("pool", pool_entry)
        got = near_dup.offer("new", candidate)
        want = reference_f(rouge_tokens(candidate), rouge_tokens(pool_entry))
        assert (got.kept, got.max_score) == (want <= 0.7, want), (lcs, m, n)
        verdicts.add(got.kept)
    assert verdicts == {True, False}   # both sides of the float boundary occur


# ------------------------------------------------------------------------------------ the filter

WORDS = ["write", "a", "poem", "about", "the", "sea", "Sea", "story", "2", "café", "中文", "list", "five"]
SEPARATORS = [" ", ", ", "! ", " - ", "\n", "'", "?"]


@st.composite
def instruction(draw) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), max_size=14))
    separators = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(words), max_size=len(words)))
    return "".join(w + s for w, s in zip(words, separators))


@SETTINGS
@given(st.lists(instruction(), max_size=25), st.lists(instruction(), max_size=4),
       st.sampled_from([0.7, 0.5, 0.9]), st.sampled_from([0, 1, 3, 10]), st.booleans())
def test_filter_matches_brute_force_reference(texts, seeds, threshold, top_k, with_mean):
    near_dup = NearDuplicateFilter(threshold=threshold, top_k=top_k, with_mean=with_mean)
    for i, seed in enumerate(seeds):
        near_dup.add(("seed", i), seed)
    ours = near_dup.offer_many(enumerate(texts))
    assert_same(ours, reference_filter(texts, threshold, top_k, seeds), top_k, with_mean)
    assert len(near_dup) == len(seeds) + sum(v.kept for v in ours)


def synthetic_stream(count: int, seed: int) -> list[str]:
    """Instruction-like texts with shared function words, near duplicates, and some long ones (more
    than 64 tokens: the pure-Python paths), enough that frequent keys get their bit masks."""
    rng = random.Random(seed)
    verbs, nouns = ["write", "explain", "list", "describe", "give"], [f"n{i}" for i in range(60)]
    texts: list[str] = []
    for _ in range(count):
        roll = rng.random()
        if texts and roll < 0.25:   # a perturbed earlier item
            words = rng.choice(texts).split()
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.5 or len(words) < 2:
                    words.insert(rng.randrange(len(words) + 1), rng.choice(nouns))
                else:
                    del words[rng.randrange(len(words))]
            texts.append(" ".join(words))
        else:
            length = rng.choice([3, 6, 10, 14, 20, 30, 45, 70, 90]) if roll < 0.35 else rng.randint(4, 16)
            texts.append(" ".join([rng.choice(verbs)] + [rng.choice(nouns + ["the", "a", "of", "in", "the"])
                                                          for _ in range(length)]))
    return texts


def test_top_k_is_exact_against_brute_force():
    texts = synthetic_stream(320, seed=3)
    reference = reference_filter(texts, top_k=10)
    assert 0 < sum(not v.kept for v in reference) < len(texts)   # both verdicts occur
    assert any(len(rouge_tokens(t)) > 64 for t in texts)
    near_dup = NearDuplicateFilter(top_k=10)
    assert_same(near_dup.offer_many(enumerate(texts)), reference)
    fast = NearDuplicateFilter(top_k=0)
    assert_same(fast.offer_many(enumerate(texts)), reference, top_k=0)


def test_word_size_boundaries_63_64_65_tokens():
    rng = random.Random(11)
    pool = [" ".join(rng.choice("abcdefg") for _ in range(length)) for length in (31, 60, 64, 65, 66, 90)]
    for length in (63, 64, 65):
        candidate = " ".join(rng.choice("abcdefg") for _ in range(length))
        near_dup = NearDuplicateFilter(threshold=1.0, top_k=10)
        for i, text in enumerate(pool):
            near_dup.add(i, text)
        want = sorted(((reference_f(rouge_tokens(candidate), rouge_tokens(t)), -i) for i, t in enumerate(pool)),
                      reverse=True)
        assert near_dup.offer("new", candidate).top_k == [(-i, f) for f, i in want], length


def test_with_mean_equals_stanford_alpaca_np_mean():
    texts = synthetic_stream(150, seed=4)
    near_dup = NearDuplicateFilter(top_k=5, with_mean=True)
    assert_same(near_dup.offer_many(enumerate(texts)), reference_filter(texts, top_k=5), top_k=5, with_mean=True)


def test_within_batch_duplicate_is_caught_and_points_at_the_first():
    near_dup = NearDuplicateFilter()
    near_dup.add("seed:0", "Give three tips for staying healthy.")
    first, second, other = near_dup.offer_many([
        ("cand:1", "Write a short poem about the autumn sea at night."),
        ("cand:2", "Write a short poem about the autumn sea at midnight!"),
        ("cand:3", "List five prime numbers."),
    ])
    assert first.kept and other.kept
    assert not second.kept and second.most_similar_id == "cand:1" and second.max_score > 0.7
    assert second.top_k[0] == ("cand:1", second.max_score)
    assert len(near_dup) == 3


def test_most_similar_ties_go_to_the_earliest_added():
    near_dup = NearDuplicateFilter(top_k=3)
    for item_id in ("x", "y", "z"):
        near_dup.add(item_id, "red blue green")   # add() is unconditional: three identical entries
    verdict = near_dup.offer("new", "red blue green")
    assert (verdict.kept, verdict.max_score, verdict.most_similar_id) == (False, 1.0, "x")
    assert verdict.top_k == [("x", 1.0), ("y", 1.0), ("z", 1.0)]
    assert len(near_dup) == 3


def test_incremental_pool_equals_filtering_from_scratch():
    texts = synthetic_stream(240, seed=5)
    scratch = NearDuplicateFilter().offer_many(enumerate(texts))
    resumed = NearDuplicateFilter()
    for index in range(120):   # a later run: the kept items of the first run are loaded with add()
        if scratch[index].kept:
            resumed.add(index, texts[index])
    assert resumed.offer_many((i, texts[i]) for i in range(120, 240)) == scratch[120:]


def test_empty_pool_and_empty_tokens():
    near_dup = NearDuplicateFilter(with_mean=True)
    assert near_dup.offer(0, "") == Verdict(kept=True, max_score=0.0, most_similar_id=None, top_k=[], mean_score=None)
    assert near_dup.offer(1, "写一首诗") == Verdict(True, 0.0, None, [], 0.0)   # rouge: no tokens
    assert near_dup.offer(2, "写一首诗") == Verdict(True, 0.0, None, [], 0.0)   # identical, still 0
    assert len(near_dup) == 3


def test_unicode_tokenizer_is_an_opt_in_deviation():
    assert unicode_tokens("Cafe\u0301 au LAIT") == ["café", "au", "lait"]
    assert unicode_tokens("Hello, 世界! ＡＢＣ") == ["hello", "世", "界", "abc"]   # NFKC folds full-width
    assert unicode_tokens("हिन्दी भाषा") == ["हिन्दी", "भाषा"]   # vowel signs stay in the word
    assert unicode_tokens("Straße") == ["strasse"]
    near_dup = NearDuplicateFilter(tokenizer="unicode")
    assert near_dup.offer(1, "写一首关于秋天的诗。").kept
    duplicate = near_dup.offer(2, "写一首关于秋天的诗")
    assert (duplicate.kept, duplicate.max_score, duplicate.most_similar_id) == (False, 1.0, 1)


def test_bad_arguments_fail_with_one_clear_line():
    with pytest.raises(ValueError, match="threshold must be in"):
        NearDuplicateFilter(threshold=1.5)
    with pytest.raises(ValueError, match="top_k must be an int"):
        NearDuplicateFilter(top_k=-1)
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        NearDuplicateFilter(tokenizer="bpe")
    with pytest.raises(TypeError, match=r"offer: item 'cand:7': text must be str, got NoneType"):
        NearDuplicateFilter().offer("cand:7", None)


# ------------------------------------------------------------------------------------ the bench

def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "rouge_filter.py"
    spec = importlib.util.spec_from_file_location("rouge_filter_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_contract_on_a_small_corpus(tmp_path, capsys):
    bench = load_bench()
    stream = bench.builtin_stream(400)
    assert stream == bench.builtin_stream(400) and stream[:300] == bench.builtin_stream(300)   # deterministic
    corpus = tmp_path / "stream.jsonl"
    corpus.write_text("".join(json.dumps({"instruction": t, "extra": 1}) + "\n" for t in stream))
    decisions = tmp_path / "decisions.jsonl"
    result = bench.main(["--corpus", str(corpus), "--limit", "300", "--reference-limit", "150",
                         "--decisions-out", str(decisions)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["identical"] is True and result["n"] == 300 and result["reference_n"] == 150
    for key in ("kept", "ours_s", "reference_s", "ratio_at_reference_n", "reference_pairs_per_s",
                "projected_reference_s_full", "projected_ratio_full"):
        assert isinstance(result[key], (int, float)), key
    rows = [json.loads(line) for line in decisions.read_text().splitlines()]
    reference = reference_filter(stream[:300], top_k=1)
    assert [(r["index"], r["kept"], r["max_score"], r["most_similar_index"]) for r in rows] == \
        [(i, v.kept, v.max_score, v.most_similar_id) for i, v in enumerate(reference)]
    assert 0 < result["kept"] < 300


def test_bench_rejects_a_bad_corpus_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"instruction": "ok"}\n{"prompt": "no instruction field"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: expected an object with a string field 'instruction'"):
        load_bench().main(["--corpus", str(corpus)])
