"""Pairwise utility matrices between hypotheses and pseudo-references for MBR decoding.

MBR needs u(y, r) for every hypothesis y and pseudo-reference r, i.e. a (H, R) matrix, and the
samples that fill both axes repeat a lot. Every utility here therefore works on the distinct
strings only: per-string features (n-gram bags, normalized tokens, ...) are computed once per
distinct string, and pairwise scores come from array operations (the clipped n-gram matches of
all pairs are popcounts of bit-packed n-gram sets, see :func:`clipped_overlap`).

All built-in utilities return values in [0, 1] (sacreBLEU's chrF and BLEU are divided by 100) so
that one abstention threshold reads the same way for every utility.

Plug in your own utility with :func:`get_utility` (a ``(hyp, ref) -> float`` callable is
vectorised over distinct pairs), :class:`MatrixUtility` (a function that already returns a whole
matrix), or :func:`register_utility` to make it available by name.
"""

from __future__ import annotations

import re
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from sacrebleu.metrics import BLEU as SacreBLEU


@runtime_checkable
class Utility(Protocol):
    """What MBR needs from a utility: a name and a (hyps x refs) score matrix."""

    name: str

    def matrix(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """Return u(hyps[i], refs[j]) as a float array of shape (len(hyps), len(refs))."""
        ...


PairFunction = Callable[[str, str], float]
MatrixFunction = Callable[[list[str], list[str]], Any]
UtilitySpec = str | Utility | PairFunction


def _check_strings(values: Sequence[str], what: str) -> list[str]:
    """Fail early on non-strings (e.g. ``None`` from a failed decode), naming the culprit."""
    if isinstance(values, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{what}[{i}] is {type(value).__name__}, expected str")
    return values


def unique_with_inverse(strings: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct strings in first-seen order and, per input, the index of its distinct string."""
    index: dict[str, int] = {}
    inverse = np.fromiter(
        (index.setdefault(s, len(index)) for s in strings), dtype=np.intp, count=len(strings)
    )
    return list(index), inverse


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of a string as integers, without a Python loop over characters."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _token_ids(token_lists: Sequence[Sequence[Hashable]]) -> list[np.ndarray]:
    """Integer ids for tokens, shared across all lists so equal tokens get equal ids."""
    vocabulary: dict[Hashable, int] = {}
    return [
        np.array([vocabulary.setdefault(t, len(vocabulary)) for t in tokens], dtype=np.int64)
        for tokens in token_lists
    ]


def ngram_counts(sequences: Sequence[np.ndarray], max_order: int) -> list[np.ndarray]:
    """Count matrices (S, V_n) of the n-grams of integer sequences, for n = 1..max_order.

    Vectorised over all sequences at once: an n-gram's id is the id of its (n-1)-gram prefix
    combined with its last symbol, re-numbered by ``np.unique``, so no Python loop touches single
    n-grams. Windows that straddle two sequences get ids too but are never counted.
    """
    lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
    flat = np.concatenate([np.zeros(0, np.int64), *(np.asarray(q, np.int64) for q in sequences)])
    owner = np.repeat(np.arange(len(sequences)), lengths)
    # Symbols left in the own sequence from each position on (the position included).
    position = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    remaining = np.repeat(lengths, lengths) - position
    base = int(flat.max()) + 1 if flat.size else 1
    counts: list[np.ndarray] = []
    ids = np.zeros(flat.size + 1, dtype=np.int64)
    for n in range(1, max_order + 1):
        keys = ids[:-1] * base + flat[n - 1 :]
        vocabulary, ids = np.unique(keys, return_inverse=True)
        valid = remaining[: ids.size] >= n
        flat_index = owner[: ids.size][valid] * vocabulary.size + ids[valid]
        counts.append(
            np.bincount(flat_index, minlength=len(sequences) * vocabulary.size).reshape(
                len(sequences), vocabulary.size
            )
        )
    return counts


def _packed_rows(bits: np.ndarray) -> np.ndarray:
    """Rows of a boolean matrix packed into uint64 words (64 columns per word)."""
    padded = np.zeros((bits.shape[0], -(-bits.shape[1] // 64) * 64), dtype=bool)
    padded[:, : bits.shape[1]] = bits
    return np.packbits(padded, axis=1).view(np.uint64)


def clipped_overlap(counts: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """sum_g min(counts[i, g], counts[j, g]) for all i in rows, j in cols.

    min(a, b) = sum_k [a >= k][b >= k], so the clipped matches of BLEU, chrF and token F1 are
    sums of set intersections, one per count level k. Each intersection is an AND of bit-packed
    rows plus a popcount: exact integer work with no BLAS call, whose threads stall badly on
    small products when the CPU is oversubscribed.
    """
    hyp, ref = counts[rows], counts[cols]
    overlap = np.zeros((len(rows), len(cols)), dtype=np.int64)
    level = 1
    while True:
        # A column contributes at level k only if both sides reach k somewhere.
        active = (hyp >= level).any(axis=0) & (ref >= level).any(axis=0)
        if not active.any():
            return overlap
        hyp_words = _packed_rows(hyp[:, active] >= level)
        ref_words = _packed_rows(ref[:, active] >= level)
        # Blocks of hypothesis rows keep the (rows, R, words) temporary near 32 MB.
        step = max(1, 4_000_000 // ref_words.size)
        for start in range(0, len(rows), step):
            block = hyp_words[start : start + step, None, :] & ref_words[None, :, :]
            overlap[start : start + step] += np.bitwise_count(block).sum(axis=-1, dtype=np.int64)
        level += 1


class DedupUtility(ABC):
    """Base class that reduces any utility to scores between distinct strings.

    Subclasses implement :meth:`_unique_scores` on the distinct strings of hyps and refs together
    (so per-string features shared by both sides are computed once); :meth:`matrix` expands the
    result back to the caller's (H, R) layout.
    """

    name: str = "utility"

    def matrix(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """Return the (len(hyps), len(refs)) utility matrix, computing each distinct pair once."""
        hyps = _check_strings(hyps, "hyps")
        refs = _check_strings(refs, "refs")
        strings, inverse = unique_with_inverse(hyps + refs)
        hyp_rows, hyp_pos = np.unique(inverse[: len(hyps)], return_inverse=True)
        ref_rows, ref_pos = np.unique(inverse[len(hyps) :], return_inverse=True)
        scores = np.asarray(self._unique_scores(strings, hyp_rows, ref_rows), dtype=np.float64)
        if scores.shape != (len(hyp_rows), len(ref_rows)):
            raise ValueError(
                f"utility {self.name!r} returned shape {scores.shape}, "
                f"expected {(len(hyp_rows), len(ref_rows))}"
            )
        return scores[np.ix_(hyp_pos, ref_pos)]

    @abstractmethod
    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        """Scores u(strings[h], strings[r]) for h in hyp_rows, r in ref_rows (all distinct)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _f_beta(
    precision: np.ndarray, recall: np.ndarray, beta: float, undefined: float = 0.0
) -> np.ndarray:
    """F_beta with ``undefined`` (not NaN) where precision and recall are both 0."""
    factor = beta**2
    denom = factor * precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (1 + factor) * precision * recall / denom
    return np.where(denom > 0, score, undefined)


class ChrF(DedupUtility):
    """Sentence-level chrF / chrF++ equal to sacreBLEU's ``sentence_chrf`` (divided by 100).

    Matches sacreBLEU's default effective-order averaging: precision and recall are averaged over
    the n-gram orders that exist in both strings, then combined into one F_beta. With
    ``eps_smoothing=True`` it follows sacreBLEU's alternative (per-order F scores averaged, the
    chrF++.py / NLTK / Moses convention).
    """

    _PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

    def __init__(
        self,
        char_order: int = 6,
        word_order: int = 0,
        beta: float = 2.0,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
    ) -> None:
        if char_order < 1 or word_order < 0:
            raise ValueError("chrF needs char_order >= 1 and word_order >= 0")
        self.char_order = char_order
        self.word_order = word_order
        self.beta = beta
        self.lowercase = lowercase
        self.whitespace = whitespace
        self.eps_smoothing = eps_smoothing
        self.name = "chrf" + "+" * word_order

    def _words(self, text: str) -> list[str]:
        """chrF++ words: split on whitespace, detach one leading or trailing punctuation mark."""
        words: list[str] = []
        for word in text.split():
            if len(word) > 1 and word[-1] in self._PUNCTUATION:
                words += [word[:-1], word[-1]]
            elif len(word) > 1 and word[0] in self._PUNCTUATION:
                words += [word[0], word[1:]]
            else:
                words.append(word)
        return words

    def _ngram_counts(self, strings: list[str]) -> list[np.ndarray]:
        """Count matrices for character orders 1..char_order, then word orders 1..word_order."""
        if self.lowercase:
            strings = [s.lower() for s in strings]
        chars = [s if self.whitespace else "".join(s.split()) for s in strings]
        counts = ngram_counts([_code_points(c) for c in chars], self.char_order)
        if self.word_order:
            counts += ngram_counts(_token_ids([self._words(s) for s in strings]), self.word_order)
        return counts

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        counts = self._ngram_counts(strings)
        n_orders = len(counts)
        totals = np.stack([c.sum(axis=1) for c in counts], axis=-1).astype(float)
        # (H, R, orders) statistics, as in sacreBLEU's per-pair match statistics.
        matches = np.stack([clipped_overlap(c, hyp_rows, ref_rows) for c in counts], axis=-1)
        n_hyp = totals[hyp_rows][:, None, :]
        n_ref = totals[ref_rows][None, :, :]
        eps = 1e-16
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(n_hyp > 0, matches / n_hyp, eps)
            recall = np.where(n_ref > 0, matches / n_ref, eps)
        if self.eps_smoothing:
            return _f_beta(precision, recall, self.beta, undefined=eps).sum(axis=-1) / n_orders
        effective = (n_hyp > 0) & (n_ref > 0)
        n_effective = effective.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            avg_precision = np.where(
                n_effective > 0, (precision * effective).sum(axis=-1) / n_effective, 0.0
            )
            avg_recall = np.where(
                n_effective > 0, (recall * effective).sum(axis=-1) / n_effective, 0.0
            )
        return _f_beta(avg_precision, avg_recall, self.beta)


class Bleu(DedupUtility):
    """Sentence-level BLEU equal to sacreBLEU's ``sentence_bleu`` (divided by 100).

    Exponential smoothing and effective order, sacreBLEU's defaults for sentence BLEU: n-gram
    orders longer than the hypothesis are left out, and each order without a match gets
    precision 1 / (2^k * total) where k counts the zero-match orders so far.
    """

    def __init__(self, tokenize: str = "13a", lowercase: bool = False, max_order: int = 4) -> None:
        if max_order < 1:
            raise ValueError("BLEU needs max_order >= 1")
        self._tokenizer = SacreBLEU(tokenize=tokenize, effective_order=True).tokenizer
        self.lowercase = lowercase
        self.max_order = max_order
        self.name = "bleu"

    def _tokens(self, text: str) -> list[str]:
        """sacreBLEU's preprocessing: optional lowercasing, right strip, its tokenizer, split."""
        if self.lowercase:
            text = text.lower()
        return self._tokenizer(text.rstrip()).split()

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        token_ids = _token_ids([self._tokens(s) for s in strings])
        lengths = np.array([len(t) for t in token_ids], dtype=float)
        correct = np.stack(
            [
                clipped_overlap(c, hyp_rows, ref_rows)
                for c in ngram_counts(token_ids, self.max_order)
            ],
            axis=-1,
        )
        hyp_len = lengths[hyp_rows][:, None]
        ref_len = lengths[ref_rows][None, :]
        total = np.maximum(hyp_len[..., None] - np.arange(self.max_order), 0.0)  # (H, 1, n)
        total = np.broadcast_to(total, correct.shape)
        # Effective order: sacreBLEU stops at the first order with no hypothesis n-grams.
        valid = np.cumprod(total > 0, axis=-1).astype(bool)
        zero = valid & (correct == 0)
        halvings = np.cumsum(zero, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(zero, 1.0 / (2.0**halvings * total), correct / total)
            log_precision = np.where(valid, np.log(np.where(valid, precision, 1.0)), 0.0)
            n_valid = valid.sum(axis=-1)
            geo_mean = np.exp(log_precision.sum(axis=-1) / np.maximum(n_valid, 1))
            brevity = np.where(
                hyp_len >= ref_len,
                1.0,
                np.where(hyp_len > 0, np.exp(1.0 - ref_len / hyp_len), 0.0),
            )
        return np.where(correct.sum(axis=-1) > 0, brevity * geo_mean, 0.0)


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD answer normalization: lowercase, drop punctuation and articles, squash whitespace."""
    text = text.lower().translate(_PUNCTUATION_TABLE)
    return " ".join(_ARTICLES.sub(" ", text).split())


class ExactMatch(DedupUtility):
    """1 if the SQuAD-normalized strings are equal, else 0; compared by hashing, not pairwise."""

    name = "exact_match"

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        _, ids = unique_with_inverse([normalize_answer(s) for s in strings])
        return (ids[hyp_rows][:, None] == ids[ref_rows][None, :]).astype(float)


class TokenF1(DedupUtility):
    """SQuAD token F1 on normalized answers (1 if both are empty, 0 if only one is)."""

    name = "f1"

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        (counts,) = ngram_counts(_token_ids([normalize_answer(s).split() for s in strings]), 1)
        lengths = counts.sum(axis=1).astype(float)
        common = clipped_overlap(counts, hyp_rows, ref_rows)
        hyp_len = lengths[hyp_rows][:, None]
        ref_len = lengths[ref_rows][None, :]
        # With precision = c/|h| and recall = c/|r|, F1 = 2c / (|h| + |r|).
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2.0 * common / (hyp_len + ref_len)
        both_empty = (hyp_len == 0) & (ref_len == 0)
        return np.where(both_empty, 1.0, np.where(common > 0, f1, 0.0))


_WORD = re.compile(r"\w+")


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Longest common subsequence length by the bit-parallel algorithm (Hyyrö 2004).

    Bit i of ``v`` is 0 where the LCS grows at position i of ``b``; Python integers act as
    len(b)-bit vectors, so each token of ``a`` costs a few big-integer operations.
    """
    if not a or not b:
        return 0
    positions: dict[Hashable, int] = {}
    for i, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << i)
    mask = (1 << len(b)) - 1
    v = mask
    for token in a:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & mask
    return len(b) - v.bit_count()


class RougeL(DedupUtility):
    """ROUGE-L F1 (beta = 1) on lowercased word tokens (``\\w+``, no stemming).

    A pair with an empty side scores 0, as in the ``rouge_score`` package.
    """

    name = "rouge_l"

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        tokens = [_WORD.findall(s.lower()) for s in strings]
        lcs = np.array(
            [[lcs_length(tokens[h], tokens[r]) for r in ref_rows] for h in hyp_rows], dtype=float
        ).reshape(len(hyp_rows), len(ref_rows))
        lengths = np.array([len(t) for t in tokens], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(lcs > 0, lcs / lengths[hyp_rows][:, None], 0.0)
            recall = np.where(lcs > 0, lcs / lengths[ref_rows][None, :], 0.0)
        return _f_beta(precision, recall, 1.0)


class MatrixUtility(DedupUtility):
    """Wraps a function that maps (distinct hyps, distinct refs) to a (H, R) matrix at once."""

    def __init__(self, fn: MatrixFunction, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        return self.fn([strings[h] for h in hyp_rows], [strings[r] for r in ref_rows])


class PairwiseUtility(MatrixUtility):
    """Wraps a ``(hyp, ref) -> float`` function; called once per distinct (hyp, ref) pair."""

    def __init__(self, fn: PairFunction, name: str | None = None) -> None:
        super().__init__(self._all_pairs, name or getattr(fn, "__name__", "custom"))
        self.pair_fn = fn

    def _all_pairs(self, hyps: list[str], refs: list[str]) -> np.ndarray:
        scores = [[float(self.pair_fn(h, r)) for r in refs] for h in hyps]
        return np.array(scores, dtype=np.float64).reshape(len(hyps), len(refs))


class BertScore(DedupUtility):
    """BERTScore F1 through the optional ``bert-score`` package (imported only when used).

    Keyword arguments go to ``bert_score.BERTScorer`` (e.g. ``lang="en"``, ``model_type``,
    ``rescale_with_baseline``, ``device``). The scorer embeds each distinct sentence once.
    """

    name = "bertscore"

    def __init__(self, **scorer_kwargs: Any) -> None:
        try:
            from bert_score import BERTScorer
        except ImportError as err:
            raise ImportError(
                "The 'bertscore' utility needs the optional bert-score package: "
                "`pip install bert-score`, or pick a built-in utility such as 'chrf'."
            ) from err
        if "lang" not in scorer_kwargs and "model_type" not in scorer_kwargs:
            scorer_kwargs["lang"] = "en"
        self._scorer = BERTScorer(**scorer_kwargs)

    def _unique_scores(
        self, strings: list[str], hyp_rows: np.ndarray, ref_rows: np.ndarray
    ) -> np.ndarray:
        cands = [strings[h] for h in hyp_rows for _ in ref_rows]
        refs = [strings[r] for _ in hyp_rows for r in ref_rows]
        _, _, f1 = self._scorer.score(cands, refs)
        return np.asarray(f1, dtype=np.float64).reshape(len(hyp_rows), len(ref_rows))


_REGISTRY: dict[str, Callable[..., Utility]] = {}


def register_utility(
    name: str, factory: Callable[..., Utility], *, overwrite: bool = False
) -> None:
    """Make ``get_utility(name, **kwargs)`` build ``factory(**kwargs)``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"utility {name!r} is already registered; pass overwrite=True to replace")
    _REGISTRY[name] = factory


def available_utilities() -> list[str]:
    """Names accepted by :func:`get_utility`."""
    return sorted(_REGISTRY)


def get_utility(spec: UtilitySpec, **kwargs: Any) -> Utility:
    """Resolve a registered name, a :class:`Utility` object, or a ``(hyp, ref) -> float`` callable.

    A bare callable is taken as a pair function; wrap whole-matrix functions in
    :class:`MatrixUtility` instead.
    """
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(
                f"unknown utility {spec!r}; available: {', '.join(available_utilities())}"
            )
        return _REGISTRY[spec](**kwargs)
    if kwargs:
        raise TypeError("keyword arguments only apply when the utility is given by name")
    if isinstance(spec, Utility):
        return spec
    if callable(spec):
        return PairwiseUtility(spec)
    raise TypeError(
        f"expected a utility name, an object with .matrix(hyps, refs), or a (hyp, ref) -> float "
        f"callable; got {type(spec).__name__}"
    )


register_utility("chrf", ChrF)
register_utility("chrf++", lambda **kwargs: ChrF(word_order=2, **kwargs))
register_utility("bleu", Bleu)
register_utility("rouge_l", RougeL)
register_utility("exact_match", ExactMatch)
register_utility("f1", TokenF1)
register_utility("bertscore", BertScore)
