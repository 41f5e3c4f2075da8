"""Exact, fast ROUGE-L near-duplicate filter with Self-Instruct semantics.

The reference (stanford_alpaca `generate_instruction.py`) scores every candidate against the whole
pool with `rouge_scorer._score_lcs` and keeps it only if the best ROUGE-L F-measure is <= 0.7. We
return exactly the same verdicts and scores, but only compute the LCS for pool entries that could
matter:

1. Overlap bound. The LCS of two token lists is at most their multiset intersection ("overlap").
   Every pool entry is indexed under keys (token, k) = "holds the token at least k times", so the
   overlap with a candidate is the number of keys they share, counted for the whole pool at once:
   a popcount of per-entry bit masks for the 64 most common keys (function words, whose posting
   lists would be long) plus one `np.bincount` over the posting lists of the other keys. Entries
   sharing no key have LCS = 0, hence F = 0.
2. Best-first verification. F grows with the LCS, so bound = F(LCS = overlap) >= F. We score the
   entries with the highest overlap first, which gives the score to beat (the k-th best so far, or
   the best when top_k = 0), then only the entries whose bound still reaches it, best bound first,
   raising it as we go. Bounds are compared a little below the score to beat, so float rounding
   never prunes a tie.
3. Bit-parallel LCS (Allison-Dix / Hyyro): the candidate's tokens are bits of a 64-bit word, and
   each step (one pool token) is four numpy ops over a whole batch of pool entries. Candidates
   longer than 64 tokens, and the odd long entry, use the same recurrence on Python ints.

Scores are then computed with the reference's float formula, F = 2*p*r/(p+r) (not 2L/(m+n): they
differ in the last bit, e.g. L=7, m=7, n=13 gives 0.7000000000000001 and is rejected).
Ties (for the most similar entry and inside top-k) go to the earliest-added pool entry; top-k lists
only entries with a score > 0.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------- tokenizers

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemmer: lower(), non-[a-z0-9] -> space, split.

    (rouge-score then drops tokens not matching ^[a-z0-9]+$; after the substitution none exist.)
    Non-ASCII letters vanish ("Caf\u00e9" -> ["caf"]) and CJK text has no tokens at all."""
    return _NON_ALPHANUM.sub(" ", text.lower()).split()


# Scripts written without spaces between words: one token per character (plus its combining marks).
_NO_SPACE_SCRIPTS = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                     "\uf900-\ufaff\U00020000-\U0003134f")


@functools.cache
def _unicode_token_re() -> re.Pattern:
    # Python's \w excludes combining marks (Indic vowel signs, Hebrew points...), so add them.
    marks = "".join(re.escape(chr(c)) for c in range(0x30000) if unicodedata.category(chr(c)).startswith("M"))
    return re.compile(rf"[{_NO_SPACE_SCRIPTS}][{marks}]*|(?:[^\W{_NO_SPACE_SCRIPTS}]|[{marks}])+")


def unicode_tokens(text: str) -> list[str]:
    """Opt-in tokenizer for any script. DEVIATION from the reference (scores differ from rouge-score):
    NFKC + casefold, words are runs of Unicode word characters and combining marks ("café" stays one
    token), and Han/Kana/Thai/Lao/Myanmar/Khmer text is split one character per token."""
    return _unicode_token_re().findall(unicodedata.normalize("NFKC", text).casefold())


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"rouge": rouge_tokens, "unicode": unicode_tokens}

# ---------------------------------------------------------------------------------- exact scoring


def _lcs_bits(match: dict[int, int], n: int, tokens: Iterable) -> int:
    """LCS of a length-n sequence, given as bit masks `match[token]` of its positions, and `tokens`.
    Bit-parallel (Allison-Dix, Hyyro 2004): a zero bit in v marks an LCS element ending there."""
    all_ones = (1 << n) - 1
    v = all_ones
    for token in tokens:
        u = v & match.get(token, 0)
        v = (v + u) | (v - u)   # = (v + (v & M)) | (v & ~M); bits above n are junk, masked below
    return n - (v & all_ones).bit_count()


def _match_bits(tokens: Sequence) -> dict:
    match: dict = {}
    for i, token in enumerate(tokens):
        match[token] = match.get(token, 0) | (1 << i)
    return match


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a  # bits over the longer list, loop over the shorter one
    return _lcs_bits(_match_bits(a), len(a), b)


def f_measure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_score._score_lcs's F, same float operations in the same order."""
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l_f(a_tokens: Sequence[str], b_tokens: Sequence[str]) -> float:
    """ROUGE-L F-measure, bit-identical to rouge_score.rouge_scorer._score_lcs(a, b).fmeasure
    (the formula is symmetric in a and b, float rounding included)."""
    return f_measure(lcs_length(a_tokens, b_tokens), len(a_tokens), len(b_tokens))


def _f_measures(lcs: np.ndarray, target_len: int, prediction_lens: np.ndarray) -> np.ndarray:
    """Vectorised f_measure (numpy float64 does the same IEEE operations as Python floats)."""
    scores = np.zeros(len(lcs), dtype=np.float64)
    hit = lcs > 0
    precision = lcs[hit] / prediction_lens[hit]
    recall = lcs[hit] / target_len
    scores[hit] = 2 * precision * recall / (precision + recall)
    return scores


if hasattr(np, "bitwise_count"):
    _popcount = np.bitwise_count
else:  # numpy < 2.0
    _BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _BYTE_POPCOUNT[x.view(np.uint8)].reshape(len(x), 8).sum(axis=1, dtype=np.uint8)

# -------------------------------------------------------------------------------------- the filter


@dataclass
class Verdict:
    kept: bool
    max_score: float
    most_similar_id: object | None       # id of the pool entry with max score (None if pool empty/all 0)
    top_k: list[tuple[object, float]] = field(default_factory=list)  # best first, scores > 0 only
    mean_score: float | None = None      # mean F over the whole pool (with_mean=True and pool not empty)


class _GrowingArray:
    """A numpy array with amortised O(1) append along its first axis; `view()` is the filled part."""

    def __init__(self, dtype, capacity: int = 4, row_shape: tuple[int, ...] = ()):
        self.data = np.zeros((capacity, *row_shape), dtype=dtype)
        self.size = 0

    def _reserve(self, size: int) -> None:
        if size > len(self.data):
            grown = np.zeros((max(size, 2 * len(self.data)), *self.data.shape[1:]), dtype=self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown

    def append(self, value) -> None:
        self._reserve(self.size + 1)
        self.data[self.size] = value
        self.size += 1

    def extend(self, values: Sequence[int]) -> None:
        self._reserve(self.size + len(values))
        self.data[self.size:self.size + len(values)] = values
        self.size += len(values)

    def view(self) -> np.ndarray:
        return self.data[:self.size]


_EPS = 1e-9           # prune bounds this far below the score to beat: float rounding never drops a tie
_FIRST_BATCH = 32     # entries with the best bounds, scored first to set the score to beat
_BATCH = 256          # then batches in bound order; the score to beat is raised between batches
_WORD = 64            # candidates up to this many tokens are uint64 bit vectors (numpy); longer: Python ints
_NUMPY_STEPS = 64     # entries up to this many tokens are also kept padded, for numpy batches; longer: Python
_STEP_COST, _ENTRY_COST, _TOKEN_COST = 1.3, 1.5, 0.12   # measured us: numpy step, Python entry, Python token
_FREQUENT_DF = 64     # a key held by this many entries gets one of 64 bits in a per-entry mask ...
_FREQUENT_BITS = 64   # ... (overlap on those keys = popcount, no posting list to scan)


class NearDuplicateFilter:
    """Greedy Self-Instruct filter: a candidate is kept iff its max ROUGE-L F against every pool entry
    is <= threshold, and a kept candidate joins the pool at once (arrival order matters).

    The pool is indexed incrementally: add()/offer() cost O(tokens), never a recomputation.
    top_k=0 skips the top-k list (only the max is searched, which is faster). with_mean=True also
    reports the mean F over the whole pool, as stanford_alpaca records, which scores every pair that
    shares a token and so is much slower."""

    def __init__(self, threshold: float = 0.7, top_k: int = 10, tokenizer: str = "rouge",
                 with_mean: bool = False):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"NearDuplicateFilter: threshold must be in [0, 1], got {threshold!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"NearDuplicateFilter: top_k must be an int >= 0, got {top_k!r}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"NearDuplicateFilter: tokenizer must be one of {sorted(TOKENIZERS)}, got {tokenizer!r}")
        self.threshold = threshold
        self.top_k = top_k
        self.tokenizer = tokenizer
        self.with_mean = with_mean
        self._tokenize = TOKENIZERS[tokenizer]
        # The pool, entry by entry (index = arrival order).
        self._ids: list[object] = []                      # caller's ids
        self._lengths = _GrowingArray(np.int64, 1024)     # number of tokens
        self._starts = _GrowingArray(np.int64, 1024)      # offset of the entry's tokens in _tokens
        self._tokens = _GrowingArray(np.int32, 8192)      # all token ids, concatenated
        self._frequent_masks = _GrowingArray(np.uint64, 1024)  # bits of the frequent keys the entry holds
        self._padded = _GrowingArray(np.int32, 1024, (_NUMPY_STEPS,))  # tokens again, 0-padded (short entries)
        # The index: a key is (token id, k) = "holds token at least k times"; shared keys = multiset overlap.
        self._vocab: dict[str, int] = {}                  # token -> id >= 1 (0: padding / unknown)
        self._keys: dict[tuple[int, int], int] = {}       # key -> key id
        self._postings: list[_GrowingArray | None] = []   # key id -> entries holding it (None once frequent)
        self._frequent_bit: dict[int, int] = {}           # key id -> its bit in _frequent_masks
        self._match = np.zeros(1024, dtype=np.uint64)     # scratch: token id -> candidate's bit mask

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item_id, text: str) -> None:
        """Add to the pool unconditionally (seeds, items kept in an earlier run)."""
        self._append(item_id, self._tokens_of("add", item_id, text))

    def offer(self, item_id, text: str) -> Verdict:
        """Score against the pool; if kept (max score <= threshold) the item joins the pool."""
        tokens = self._tokens_of("offer", item_id, text)
        verdict = self._judge(tokens)
        if verdict.kept:
            self._append(item_id, tokens)
        return verdict

    def offer_many(self, items: Iterable[tuple[object, str]]) -> list[Verdict]:
        """offer() each (id, text) in order: later items are judged against earlier kept ones."""
        return [self.offer(item_id, text) for item_id, text in items]

    # ---------------------------------------------------------------------------- the pool index

    def _tokens_of(self, method: str, item_id, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"NearDuplicateFilter.{method}: item {item_id!r}: text must be str, "
                            f"got {type(text).__name__}")
        return self._tokenize(text)

    def _append(self, item_id, tokens: list[str]) -> None:
        index = len(self._ids)
        token_ids = []
        for token in tokens:
            token_id = self._vocab.get(token)
            if token_id is None:
                token_id = self._vocab[token] = len(self._vocab) + 1
            token_ids.append(token_id)
        self._ids.append(item_id)
        self._starts.append(self._tokens.size)
        self._lengths.append(len(token_ids))
        self._tokens.extend(token_ids)
        self._frequent_masks.append(0)
        self._padded.append(0)
        if len(token_ids) <= _NUMPY_STEPS:
            self._padded.data[index, :len(token_ids)] = token_ids
        if len(self._vocab) >= len(self._match):
            self._match = np.zeros(2 * len(self._vocab) + 1, dtype=np.uint64)
        for token_id, count in Counter(token_ids).items():
            for k in range(1, count + 1):
                key_id = self._keys.get((token_id, k))
                if key_id is None:
                    key_id = self._keys[(token_id, k)] = len(self._postings)
                    self._postings.append(_GrowingArray(np.int32))
                bit = self._frequent_bit.get(key_id)
                if bit is not None:
                    self._frequent_masks.data[index] |= np.uint64(bit)
                    continue
                posting = self._postings[key_id]
                posting.append(index)
                if posting.size >= _FREQUENT_DF and len(self._frequent_bit) < _FREQUENT_BITS:
                    bit = self._frequent_bit[key_id] = 1 << len(self._frequent_bit)
                    self._frequent_masks.view()[posting.view()] |= np.uint64(bit)
                    self._postings[key_id] = None

    def _overlap(self, token_ids: list[int]) -> np.ndarray | None:
        """Multiset overlap of the candidate with every pool entry (None: no shared token at all)."""
        postings, bits = [], 0
        for token_id, count in Counter(token_ids).items():
            for k in range(1, count + 1):
                key_id = self._keys.get((token_id, k))
                if key_id is None:
                    break  # nobody holds the token k times, so nobody holds it k+1 times
                if key_id in self._frequent_bit:
                    bits |= self._frequent_bit[key_id]
                else:
                    postings.append(self._postings[key_id].view())
        if not postings and not bits:
            return None
        pool_size = len(self._ids)
        # Overlap <= candidate length: uint8 when it fits (faster scans of the whole pool later).
        dtype = np.uint8 if len(token_ids) < 256 else np.int64
        overlap = _popcount(self._frequent_masks.view() & np.uint64(bits)).astype(dtype, copy=False) if bits \
            else np.zeros(pool_size, dtype)
        if postings:
            np.add(overlap, np.bincount(np.concatenate(postings), minlength=pool_size), out=overlap, casting="unsafe")
        return overlap

    # --------------------------------------------------------------------------------- judging

    def _judge(self, tokens: list[str]) -> Verdict:
        pool_size = len(self._ids)
        mean = (0.0 if pool_size else None) if self.with_mean else None
        known = [self._vocab.get(token, 0) for token in tokens]  # 0: not in the pool, matches nothing
        overlap = self._overlap([t for t in known if t])
        if overlap is None:  # empty pool, no tokens, or no token in common: every F is 0
            return Verdict(kept=True, max_score=0.0, most_similar_id=None, top_k=[], mean_score=mean)

        wanted = max(self.top_k, 1)
        if self.with_mean:
            scored = np.flatnonzero(overlap)  # F > 0 exactly where a token is shared
            scores = self._lcs_scores(known, scored)
        else:
            scored, scores = self._search(known, overlap, wanted)

        best_first = np.lexsort((scored, -scores))[:wanted]  # ties: earliest-added first
        top = [(self._ids[i], float(f)) for i, f in zip(scored[best_first], scores[best_first])]
        if self.with_mean:
            all_scores = np.zeros(pool_size, dtype=np.float64)
            all_scores[scored] = scores
            mean = float(np.mean(all_scores))  # np.mean over the pool in order, as stanford_alpaca does
        max_score = top[0][1]
        return Verdict(kept=max_score <= self.threshold, max_score=max_score, most_similar_id=top[0][0],
                       top_k=top[:self.top_k], mean_score=mean)

    def _search(self, known: list[int], overlap: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact F of every entry that could be among the `wanted` best; (pool indices, scores) of the
        entries scored. An entry with overlap o and length m has F <= bound = 2o/(m+n) <= 2o/(o+n).
        Overwrites `overlap`."""
        n, lengths = len(known), self._lengths.view()
        first_size = max(_FIRST_BATCH, 2 * wanted)
        # Score first the best bounds among the highest overlap levels holding >= first_size entries ...
        level = int(overlap.max())
        while level > 1 and np.count_nonzero(overlap >= level) < first_size:
            level -= 1
        first = np.flatnonzero(overlap >= level)
        if len(first) > first_size:
            bounds = 2.0 * overlap[first] / (lengths[first] + n)
            first = first[np.argpartition(bounds, len(first) - first_size)[-first_size:]]
        scored, scores = [first], [self._lcs_scores(known, first)]
        best = np.sort(scores[0])[-wanted:]   # the wanted best scores so far; F > 0 for all scored
        beat = best[0] - _EPS if len(best) == wanted else 0.0  # fewer: every entry sharing a token counts
        # ... then only the entries whose bound reaches the wanted-th best so far, best bound first.
        overlap[first] = 0
        levels = np.arange(n + 1)
        min_level = max(1, int(np.argmax(2.0 * levels / (levels + n) >= beat)))  # lowest level that can reach it
        rest = np.flatnonzero(overlap >= min_level)
        bounds = 2.0 * overlap[rest] / (lengths[rest] + n)
        keep = bounds >= beat
        rest, bounds = rest[keep], bounds[keep]
        order = np.argsort(-bounds, kind="stable")
        rest, bounds = rest[order], bounds[order]
        while len(rest):
            scored.append(rest[:_BATCH])
            scores.append(self._lcs_scores(known, rest[:_BATCH]))
            rest, bounds = rest[_BATCH:], bounds[_BATCH:]
            best = np.sort(np.concatenate((best, scores[-1])))[-wanted:]
            beat = best[0] - _EPS if len(best) == wanted else 0.0
            keep = int(np.count_nonzero(bounds >= beat))  # bounds are sorted: a prefix can still win
            rest, bounds = rest[:keep], bounds[:keep]
        return np.concatenate(scored), np.concatenate(scores)

    # ------------------------------------------------------------------------------ exact LCS

    def _lcs_scores(self, known: list[int], docs: np.ndarray) -> np.ndarray:
        """Exact ROUGE-L F of the candidate (token ids `known`, 0 = unknown) against pool entries `docs`."""
        n, lengths = len(known), self._lengths.view()[docs]
        match = _match_bits(known)
        match.pop(0, None)  # unknown tokens match nothing
        lcs = np.zeros(len(docs), dtype=np.int64)
        by_python = self._python_share(lengths) if n <= _WORD else np.ones(len(docs), dtype=bool)
        if not by_python.all():
            by_numpy = ~by_python
            lcs[by_numpy] = self._lcs_numpy(match, n, docs[by_numpy], int(lengths[by_numpy].max()))
        if by_python.any():
            tokens, starts = self._tokens.data, self._starts.view()
            lcs[by_python] = [_lcs_bits(match, n, tokens[starts[d]:starts[d] + m].tolist())
                              for d, m in zip(docs[by_python], lengths[by_python])]
        return _f_measures(lcs, n, lengths)

    @staticmethod
    def _python_share(lengths: np.ndarray) -> np.ndarray:
        """Which entries to score one by one in Python: a numpy batch runs as many steps as its longest
        entry, so a few long entries are cheaper in Python. Picks the cheapest split by length."""
        if lengths.max() <= 32:   # the usual case: too short for Python to be worth it
            return np.zeros(len(lengths), dtype=bool)
        descending = np.sort(lengths)[::-1]
        python_cost = np.concatenate(([0.0], np.cumsum(_ENTRY_COST + _TOKEN_COST * descending)))
        numpy_cost = np.append(np.where(descending <= _NUMPY_STEPS, _STEP_COST * descending, np.inf), 0.0)
        cut = int(np.argmin(python_cost + numpy_cost))   # the `cut` longest go to Python
        return lengths > descending[cut] if cut < len(lengths) else np.ones(len(lengths), dtype=bool)

    def _lcs_numpy(self, match: dict[int, int], n: int, docs: np.ndarray, steps: int) -> np.ndarray:
        """Bit-parallel LCS of the candidate (n <= 64 tokens, `match`: token id -> bits) against a
        batch of entries (<= _NUMPY_STEPS tokens): one numpy op per bit operation for the batch."""
        token_ids = np.fromiter(match, dtype=np.int64, count=len(match))
        self._match[token_ids] = np.fromiter(match.values(), dtype=np.uint64, count=len(match))
        masks = self._match[self._padded.data[docs, :steps].T]   # (step, entry); padding is token 0: M = 0
        self._match[token_ids] = 0
        v = np.full(len(docs), np.uint64(0xFFFFFFFFFFFFFFFF))
        u = np.empty_like(v)
        w = np.empty_like(v)
        for m in masks:   # v' = (v + (v & M)) | (v & ~M), mod 2^64
            np.bitwise_and(v, m, out=u)
            np.subtract(v, u, out=w)
            np.add(v, u, out=v)
            np.bitwise_or(v, w, out=v)
        return n - _popcount(v & np.uint64((1 << n) - 1)).astype(np.int64)
