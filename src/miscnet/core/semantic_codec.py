"""Entropy coding of the semantic layer: names, details and caption in one payload.

MISC counts its text at 8 bits per character. Captions are ordinary English, so a static model of
English words codes them in a fraction of that. The encoder tries three codecs and keeps the
smallest payload:

* ``CODEC_TEXT_RAW``: UTF-8;
* ``CODEC_TEXT_BROTLI``: brotli at quality 11 (its built-in dictionary knows English);
* ``CODEC_TEXT_WORDMODEL``: a word-level model (wordfreq's English unigram frequencies, a boost
  for words that image descriptions use, and an adaptive cache of the words already sent) driving
  an arithmetic (range) coder.

For raw and brotli the fields are joined by ``\\n`` (a backslash and newlines inside a field are
escaped). The word model codes fields one after the other, each ended by an END symbol. A field is
tokenised into ASCII letter runs (words), single other characters (symbols) and runs of spaces
(gaps). Each token is coded as a class (word in the vocabulary or cache / word to spell / symbol /
end of field), then its content, then the number of spaces in front of it, all with contexts
chosen so the common cases cost almost nothing: a space between words, no space before a comma, a
capital after a full stop, "s" after an apostrophe. Words outside the vocabulary are spelt with a
letter-bigram model and join the cache; characters outside the symbol table are sent as code
points once and learned. So any string, of any script, round-trips exactly.

The range coder is our own (64-bit window, integer frequencies, Python integers) rather than
constriction's: the model is part of the format, so it must be integer arithmetic that no library
release can change, and the coder flushes byte-exactly where a 32-bit-word coder wastes up to 4
bytes per layer.

The model depends on wordfreq 3.1.1's data and on data/caption_words.txt; a checksum of both is
pinned, and a mismatch disables the word model (the encoder falls back to brotli and the decoder
refuses such payloads) instead of silently decoding garbage.
"""

from __future__ import annotations

import array
import decimal
import functools
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import brotli
import numpy as np

from miscnet.core.errors import BitstreamError, SemanticsError
from miscnet.core.semantics import MAX_OBJECTS_HARD, SemanticObject, Semantics
from miscnet.v1 import bitstream_pb2 as pb

MODEL_VERSION = 1
MAX_TEXT_CHARS = 1 << 16  # decoded text cap: a corrupt layer cannot make us build more than this
# crc32 of the model's data (wordfreq 3.1.1 'en' + data/caption_words.txt); see _lexicon()
MODEL_CHECKSUM = 1631792483

_CAPTION_WORDS = Path(__file__).with_name("data") / "caption_words.txt"


def misc_raw_bytes(sem: Semantics) -> int:
    """MISC's accounting: 8 bits per character of names + details + caption, i.e. bytes = chars."""
    return sem.text_chars()


# =========================================================================== range coder
# A carry-propagating range coder on a 64-bit window. Frequencies are integers with a total of at
# most 2**48 (in practice below 2**44), so the range (kept >= 2**56) divided by the total loses at
# most 2**-8 relative (in practice 2**-12).

_TOP = 1 << 64
_MASK = _TOP - 1
_BOT = 1 << 56
_MAX_TOTAL = 1 << 48
# The encoder drops at most this many trailing zero bytes (the decoder reads zeros past the end),
# so a decoder that needs more than that past the end knows the payload is truncated or garbage.
_MAX_ZERO_RUN = 16


class _RangeEncoder:
    __slots__ = ("low", "rng", "out")

    def __init__(self) -> None:
        self.low = 0
        self.rng = _MASK
        self.out = bytearray()

    def encode(self, cum: int, freq: int, total: int) -> None:
        r = self.rng // total
        self.low += r * cum
        self.rng = r * freq
        if self.low >= _TOP:
            self._carry()
        while self.rng < _BOT:
            self.out.append(self.low >> 56)
            self.low = (self.low << 8) & _MASK
            self.rng <<= 8

    def _carry(self) -> None:
        # The coded number stays below 1, so the carry always stops inside ``out``.
        self.low -= _TOP
        i = len(self.out) - 1
        while self.out[i] == 0xFF:
            self.out[i] = 0
            i -= 1
        self.out[i] += 1

    def finish(self) -> bytes:
        # Emit the number in [low, low + rng) with the most trailing zero bits; the decoder reads
        # zeros past the end, so trailing zero bytes are dropped.
        if self.low == 0 or self.low + self.rng > _TOP:
            x = 0 if self.low == 0 else _TOP
        else:
            x = -(-self.low // _BOT) * _BOT  # a multiple of 2**56 exists because rng >= 2**56
        self.low = x
        if self.low >= _TOP:
            self._carry()
        self.out.append((self.low >> 56) & 0xFF)
        out = bytes(self.out)
        return out[: max(len(out.rstrip(b"\0")), len(out) - _MAX_ZERO_RUN)]


class _RangeDecoder:
    __slots__ = ("data", "pos", "code", "rng", "r")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 8
        self.code = int.from_bytes(data[:8].ljust(8, b"\0"), "big")  # offset from the window's low
        self.rng = _MASK
        self.r = 1

    def target(self, total: int) -> int:
        self.r = self.rng // total
        v = self.code // self.r
        if v >= total:  # an encoder never leaves the first r * total of the range
            raise BitstreamError("semantic layer: corrupt word-model payload")
        return v

    def consume(self, cum: int, freq: int) -> None:
        self.code -= self.r * cum
        self.rng = self.r * freq
        while self.rng < _BOT:
            if self.pos > len(self.data) + _MAX_ZERO_RUN + 6:
                raise BitstreamError("semantic layer: truncated word-model payload")
            b = self.data[self.pos] if self.pos < len(self.data) else 0
            self.pos += 1
            self.code = (self.code << 8) | b
            self.rng <<= 8

    def check_end(self) -> None:
        # The encoder writes one byte per renormalisation plus one; more bytes than that were
        # never written by it.
        if len(self.data) > self.pos - 7:
            raise BitstreamError("semantic layer: trailing bytes after the word-model payload")


# =========================================================================== adaptive tables


class _Table:
    """Adaptive frequencies over a small alphabet; every symbol keeps a count >= 1."""

    __slots__ = ("counts", "total", "inc", "limit")

    def __init__(self, prior: list[int], inc: int, limit: int = 1 << 16) -> None:
        self.counts = list(prior)
        self.total = sum(self.counts)
        self.inc = inc
        self.limit = limit

    def update(self, s: int) -> None:
        if self.inc:
            self.counts[s] += self.inc
            self.total += self.inc
            if self.total > self.limit:
                self.counts = [(c + 1) >> 1 for c in self.counts]
                self.total = sum(self.counts)

    def append(self, count: int) -> int:
        self.counts.append(count)
        self.total += count
        return len(self.counts) - 1


class _Coder:
    """Encoder or decoder behind one interface, so the model is walked by a single function."""

    def __init__(self, payload: bytes | None = None) -> None:
        self.enc = _RangeEncoder() if payload is None else None
        self.dec = None if payload is None else _RangeDecoder(payload)

    @property
    def encoding(self) -> bool:
        return self.enc is not None

    def table(self, t: _Table, s: int | None) -> int:
        counts = t.counts
        if self.enc is not None:
            assert s is not None
            self.enc.encode(sum(counts[:s]), counts[s], t.total)
        else:
            v = self.dec.target(t.total)
            cum = 0
            s = 0
            while cum + counts[s] <= v:
                cum += counts[s]
                s += 1
            self.dec.consume(cum, counts[s])
        t.update(s)
        return s

    def static(self, cums: list[int], s: int | None) -> int:
        """A fixed distribution given as cumulative counts (len = alphabet + 1)."""
        total = cums[-1]
        if self.enc is not None:
            assert s is not None
            self.enc.encode(cums[s], cums[s + 1] - cums[s], total)
            return s
        v = self.dec.target(total)
        lo, hi = 0, len(cums) - 2
        while lo < hi:  # the last s with cums[s] <= v
            mid = (lo + hi + 1) >> 1
            if cums[mid] <= v:
                lo = mid
            else:
                hi = mid - 1
        self.dec.consume(cums[lo], cums[lo + 1] - cums[lo])
        return lo

    def uniform(self, n: int, s: int | None) -> int:
        if self.enc is not None:
            assert s is not None
            self.enc.encode(s, 1, n)
            return s
        v = self.dec.target(n)
        self.dec.consume(v, 1)
        return v


# =========================================================================== static lexicon

_WORD_RE = re.compile(r"[a-z]+")
_FREQ_SCALE = 1 << 28  # static word counts: frequency * 2**28 (the rarest wordfreq words get 3)
_CAPTION_BOOST = 8  # image-description words are this much likelier than in general text
_MAX_NEW_WORDS = 1 << 14  # spelt words that join the cache; later ones are spelt every time
_SPELL_CUTOFF = 700  # letter statistics from words above frequency 10**-7 (the tail is noisy)


@dataclass(frozen=True)
class _Lexicon:
    words: tuple[str, ...]
    index: dict[str, int]
    static: array.array  # count per slot (vocabulary, then zeros for new words); int64
    tree: array.array  # Fenwick tree over ``static``, 1-based; int64
    total: int
    top: int  # highest power of two <= len(static)
    spell: tuple[list[int], ...]  # per previous letter (0 = start): cumulative counts, END first
    checksum: int


def _caption_words() -> list[str]:
    words = []
    for line in _CAPTION_WORDS.read_text(encoding="utf-8").splitlines():
        for w in line.split("#", 1)[0].split():
            if _WORD_RE.fullmatch(w):
                words.append(w)
    return sorted(set(words))


def _bucket_counts(n: int) -> list[int]:
    """round(2**28 * 10**(-b/100)) for each bucket b, in decimal arithmetic: the same on every platform
    (a float pow() comes from the C library and may differ in the last bit)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        scale = decimal.Decimal(_FREQ_SCALE)
        return [max(1, int((scale * decimal.Decimal(10) ** (decimal.Decimal(-b) / 100))
                           .to_integral_value(decimal.ROUND_HALF_EVEN))) for b in range(n)]


@functools.lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    """Build the static model once per process (about 0.3 s, mostly loading wordfreq)."""
    import wordfreq  # imported here: only the word model needs it

    buckets = wordfreq.get_frequency_list("en")  # bucket b holds words of frequency 10**(-b/100)
    words: list[str] = []
    bucket_of: list[int] = []
    for b, bucket in enumerate(buckets):
        # [a-z]+ words; keeping wordfreq's own string objects (it caches them anyway) saves memory
        found = [w for w in bucket if w.isascii() and w.isalpha() and w.islower()]
        words += found
        bucket_of += [b] * len(found)
    boosted = _caption_words()
    crc = zlib.crc32("\n".join(words).encode())
    crc = zlib.crc32(bytes(np.array(bucket_of, dtype="<u2")), crc)
    crc = zlib.crc32("\n".join(boosted).encode(), crc)

    index = dict(zip(words, range(len(words)), strict=True))
    # counts per bucket computed once in integers, so every word of a bucket gets the same count
    per_bucket = _bucket_counts(len(buckets))
    counts = np.array([per_bucket[b] for b in bucket_of] + [0] * _MAX_NEW_WORDS, dtype=np.int64)
    for w in boosted:
        i = index.get(w)
        if i is not None:
            counts[i] *= _CAPTION_BOOST
    n = len(counts)
    cum = np.concatenate(([0], np.cumsum(counts)))
    pos = np.arange(1, n + 1)
    tree = np.concatenate(([0], cum[pos] - cum[pos - (pos & -pos)]))

    # letter bigrams (END = 0, a..z = 1..26) from the vocabulary's word types
    common = [w for w, b in zip(words, bucket_of, strict=True) if b < _SPELL_CUTOFF]
    codes = np.frombuffer(("{" + "{".join(common) + "{").encode(), dtype=np.uint8).astype(np.int64) - 96
    codes[codes == 27] = 0  # '{' is 123 = 'z' + 1: word boundary
    pairs = np.bincount(codes[:-1] * 27 + codes[1:], minlength=27 * 27).reshape(27, 27)
    pairs = pairs * 4 + 1  # every letter possible after every letter
    pairs[0, 0] = 1  # an empty word is never sent
    spell = tuple([0] + np.cumsum(row).tolist() for row in pairs)
    return _Lexicon(
        words=tuple(words), index=index, static=array.array("q", counts.tobytes()),
        tree=array.array("q", tree.astype(np.int64).tobytes()),
        total=int(cum[-1]), top=1 << (n.bit_length() - 1), spell=spell, checksum=crc,
    )


@functools.lru_cache(maxsize=1)
def _model() -> _Lexicon | None:
    """The lexicon, or None where the installed data differ from the pinned model (or are missing)."""
    try:
        lex = _lexicon()
    except (ImportError, OSError, LookupError):
        return None
    return lex if lex.checksum == MODEL_CHECKSUM else None


# =========================================================================== the word model

# token classes
_C_WORD, _C_SPELL, _C_SYM, _C_END = range(4)
# field kinds
_F_NAME, _F_DETAIL, _F_CAPTION = range(3)
# what came before, for the class and case contexts
_P_START, _P_WORD, _P_STOP, _P_COMMA, _P_APOS, _P_NL, _P_DIGIT, _P_SYM = range(8)
# cases
_LOWER, _TITLE, _UPPER, _MIXED = range(4)

_SYMBOLS = (
    ".,'-\n:;!?\"()/&%+*=#@$[]{}<>_~`^|\\\t"
    "0123456789"
    "\u2019\u2018\u201c\u201d\u2014\u2013\u2026\u00b0\u00d7\u00e9"
)
_SYM_INDEX = {c: i for i, c in enumerate(_SYMBOLS)}
_SYM_OTHER = len(_SYMBOLS)  # a learned symbol (or a new one)
_SUFFIXES = ("s", "t", "re", "ll", "ve", "d", "m")  # after an apostrophe: subject's, don't
_STOPS = ".!?\u2026"
_COMMAS = ",;:"
_APOS = "'\u2019"
_OPEN = "([{\u201c\u2018"
_CLOSE = ".,;:!?)]}%\u201d\u2026"
_DASH = "-/\u2013\u2014"
_GAP_MAX = 8  # gap symbols 0..7 are the gap; 8 means "8 more spaces, then another gap symbol"

# gap classes
_G_START, _G_WORD, _G_CLOSE, _G_OPEN, _G_QUOTE, _G_DASH, _G_NL, _G_DIGIT, _G_OTHER, _G_END = range(10)

# The word distribution mixes the static model and a cache of the words sent so far with fixed
# weights: P(w) = (D * S(w) / T + E * c(w) / n) / (D + E), S the static counts (total T), c(w) the
# word's count in the cache and n the cache's total. The cache is halved when n reaches _CACHE_MAX.
_CACHE_D = 4
_CACHE_E = 1
_CACHE_MAX = 2048


def _gap_class(kind: int, text: str) -> int:
    if kind == _C_END:
        return _G_END
    if kind != _C_SYM:
        return _G_WORD
    if text in _CLOSE:
        return _G_CLOSE
    if text in _OPEN:
        return _G_OPEN
    if text in "\"'\u2019":
        return _G_QUOTE
    if text in _DASH:
        return _G_DASH
    if text == "\n":
        return _G_NL
    if text.isdigit():
        return _G_DIGIT
    return _G_OTHER


def _gap_prior(prev: int, cur: int) -> list[int]:
    """Hand-set starting counts for the number of spaces between two token classes."""
    likely = 1  # one space, unless a rule below says otherwise
    strong = 60
    if cur in (_G_END, _G_CLOSE, _G_NL) or prev in (_G_START, _G_OPEN, _G_NL):
        likely = 0
    elif prev == _G_DASH or cur == _G_DASH:
        likely, strong = 0, 12
    elif prev == _G_DIGIT and cur == _G_DIGIT:
        likely = 0
    elif cur == _G_QUOTE:
        likely, strong = (0, 20) if prev == _G_WORD else (1, 8)
    elif prev == _G_QUOTE:
        likely, strong = 0, 6
    elif prev == _G_DIGIT or cur == _G_DIGIT or cur == _G_OTHER or prev == _G_OTHER:
        strong = 10
    prior = [1] * (_GAP_MAX + 1)
    prior[likely] = strong
    if likely == 0:
        prior[1] = max(2, strong // 20)
    return prior


def _class_prior(field: int, prev: int) -> list[int]:
    """Starting counts for (word, spell, symbol, end) given the field and what came before."""
    if prev == _P_START:
        return [60, 2, 3, 1]
    if prev == _P_WORD:
        return {_F_NAME: [24, 1, 2, 24], _F_DETAIL: [70, 2, 12, 2], _F_CAPTION: [70, 2, 12, 1]}[field]
    if prev == _P_STOP:
        return {_F_NAME: [2, 1, 2, 20], _F_DETAIL: [6, 1, 2, 40], _F_CAPTION: [40, 2, 4, 8]}[field]
    if prev == _P_APOS:
        return [40, 2, 4, 2]
    if prev == _P_COMMA:
        return [40, 2, 4, 1]
    if prev == _P_DIGIT:
        return [10, 1, 30, 3]
    return [30, 2, 10, 4]


def _symbol_prior(prev: int) -> list[int]:
    """Starting counts for the symbol table (plus 'other') given what came before."""
    prior = [1] * (len(_SYMBOLS) + 1)
    if prev == _P_WORD:
        for c, n in ((".", 40), (",", 50), ("'", 6), ("-", 10), (":", 3), (";", 2), (")", 3),
                     ("!", 2), ("?", 1), ("\u2019", 3), ("\n", 2), ('"', 2)):
            prior[_SYM_INDEX[c]] = n
    elif prev == _P_DIGIT:
        for c in "0123456789":
            prior[_SYM_INDEX[c]] = 12
        for c, n in ((".", 6), (",", 6), ("%", 3), ("-", 2), (":", 2)):
            prior[_SYM_INDEX[c]] = n
    elif prev == _P_START:
        for c, n in (('"', 4), ("(", 2), ("-", 3), ("\u201c", 2)):
            prior[_SYM_INDEX[c]] = n
        for c in "0123456789":
            prior[_SYM_INDEX[c]] = 3
    else:
        for c, n in (("\n", 6), ('"', 4), (")", 3), ("(", 2), ("-", 3)):
            prior[_SYM_INDEX[c]] = n
        for c in "0123456789":
            prior[_SYM_INDEX[c]] = 2
    prior[_SYM_OTHER] = 2
    return prior


def _suffix_prior() -> list[int]:
    return [40, 6, 4, 4, 4, 4, 4, 8]  # _SUFFIXES, then "another word"


def _case_prior(name: int, start: int, prev_case: int) -> list[int]:
    if name:
        return [8, 40, 2, 1] if prev_case != _LOWER else [30, 8, 1, 1]
    if start:
        return [3, 50, 2, 1]
    if prev_case == _TITLE:
        return [30, 12, 1, 1]
    return [80, 4, 1, 1]


def _case_of(word: str) -> int:
    if word.islower():
        return _LOWER
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return _TITLE
    if word.isupper():
        return _UPPER
    return _MIXED


_TOKEN_RE = re.compile(r"( *)(?:([A-Za-z]+)|([^ ]))", re.S)


def _tokens(text: str) -> list[tuple[int, int, str]]:
    """(gap before, class, text) per token, then (trailing gap, END, '')."""
    out = []
    end = 0
    for m in _TOKEN_RE.finditer(text):
        word = m.group(2)
        out.append((len(m.group(1)), _C_WORD if word else _C_SYM, word or m.group(3)))
        end = m.end()
    out.append((len(text) - end, _C_END, ""))
    return out


class _WordModel:
    """The adaptive state shared by encoder and decoder; ``code_field`` walks one field."""

    def __init__(self, lex: _Lexicon, coder: _Coder) -> None:
        self.lex = lex
        self.c = coder
        self.tables: dict[tuple, _Table] = {}
        self.cache: dict[int, int] = {}  # Fenwick nodes of the cache counts (sparse)
        self.cache_freq: dict[int, int] = {}  # slot -> cache count
        self.n = 0  # cache total
        self.new_words: dict[str, int] = {}
        self.new_list: list[str] = []
        self.learned = _Table([1], inc=24)  # learned symbols, entry 0 = a new one
        self.learned_chars: list[str] = []
        self.chars = 0

    # ---- tables by context
    def _t(self, inc: int, prior, *key) -> _Table:
        """The adaptive table for context ``key``, created from ``prior(*key)`` on first use."""
        t = self.tables.get((prior, *key))
        if t is None:
            t = self.tables[(prior, *key)] = _Table(prior(*key), inc)
        return t

    # ---- the word distribution: static counts plus a sparse cache, both as Fenwick trees
    def _word_code(self, slot: int | None) -> int:
        lex = self.lex
        st, ct = lex.tree, self.cache
        # integer weights of the two parts: a * S(w) + b * c(w), total a * T + b * n
        a = _CACHE_D * max(self.n, 1)
        b = _CACHE_E * lex.total if self.n else 0
        total = a * lex.total + b * self.n
        if self.c.encoding:
            assert slot is not None
            cs = cc = 0
            i = slot
            while i > 0:
                cs += st[i]
                cc += ct.get(i, 0)
                i -= i & -i
            freq = a * lex.static[slot] + b * self.cache_freq.get(slot, 0)
            self.c.enc.encode(a * cs + b * cc, freq, total)
            return slot
        v = self.c.dec.target(total)
        pos, rem, step, n = 0, v, lex.top, len(lex.static)
        while step:
            nxt = pos + step
            if nxt <= n:
                t = a * st[nxt] + b * ct.get(nxt, 0)
                if t <= rem:
                    pos = nxt
                    rem -= t
            step >>= 1
        freq = a * lex.static[pos] + b * self.cache_freq.get(pos, 0) if pos < n else 0
        if freq <= 0:
            raise BitstreamError("semantic layer: corrupt word-model payload")
        self.c.dec.consume(v - rem, freq)
        return pos

    def _see(self, slot: int) -> None:
        """Count a word just sent: captions repeat the objects' names and their own words."""
        if self.n >= _CACHE_MAX:  # halve, so long texts keep adapting and totals stay bounded
            self.cache_freq = {k: c // 2 for k, c in self.cache_freq.items() if c >= 2}
            self.cache = {}
            self.n = 0
            for k, c in sorted(self.cache_freq.items()):
                self._fenwick_add(k, c)
        self._fenwick_add(slot, 1)
        self.cache_freq[slot] = self.cache_freq.get(slot, 0) + 1

    def _fenwick_add(self, slot: int, c: int) -> None:
        self.n += c
        i, n, ct = slot + 1, len(self.lex.static), self.cache
        while i <= n:
            ct[i] = ct.get(i, 0) + c
            i += i & -i

    def _slot(self, word: str) -> int | None:
        i = self.lex.index.get(word)
        if i is None:
            i = self.new_words.get(word)
        return i

    def _spell(self, word: str | None) -> str:
        spell = self.lex.spell
        if self.c.encoding:
            assert word is not None
            prev = 0
            for ch in word:
                s = ord(ch) - 96
                self.c.static(spell[prev], s)
                prev = s
            self.c.static(spell[prev], 0)
            return word
        letters = []
        prev = 0
        while True:
            s = self.c.static(spell[prev], None)
            if s == 0:
                break
            letters.append(chr(96 + s))
            prev = s
            if len(letters) + self.chars > MAX_TEXT_CHARS:
                raise BitstreamError("semantic layer: decoded text over the size limit")
        if not letters:
            raise BitstreamError("semantic layer: corrupt word-model payload (empty word)")
        return "".join(letters)

    def _add_word(self, word: str) -> int | None:
        if len(self.new_list) >= _MAX_NEW_WORDS:
            return None
        slot = len(self.lex.words) + len(self.new_list)
        self.new_list.append(word)
        self.new_words[word] = slot
        return slot

    def _symbol(self, prev: int, ch: str | None) -> str:
        t = self._t(12, _symbol_prior, prev)
        s = self.c.table(t, None if ch is None else _SYM_INDEX.get(ch, _SYM_OTHER))
        if s < _SYM_OTHER:
            return _SYMBOLS[s]
        # learned symbols: entry 0 is "a new character", then the ones learned so far
        want = None
        if ch is not None:
            want = self.learned_chars.index(ch) + 1 if ch in self.learned_chars else 0
        k = self.c.table(self.learned, want)
        if k > 0:
            return self.learned_chars[k - 1]
        cp = None if ch is None else ord(ch)
        hi = self.c.uniform(0x110000 >> 10, None if cp is None else cp >> 10)
        lo = self.c.uniform(1024, None if cp is None else cp & 1023)
        cp = (hi << 10) | lo
        if 0xD800 <= cp <= 0xDFFF:
            raise BitstreamError("semantic layer: corrupt word-model payload (surrogate)")
        ch = chr(cp)
        if ch == " " or ch in _SYM_INDEX or ch in self.learned_chars or (ch.isascii() and ch.isalpha()):
            raise BitstreamError("semantic layer: corrupt word-model payload (bad symbol)")
        self.learned_chars.append(ch)
        self.learned.append(24)
        return ch

    def _gap(self, prev_g: int, cur_g: int, gap: int | None) -> int:
        t = self._t(16, _gap_prior, prev_g, cur_g)
        total = 0
        while True:
            want = None if gap is None else min(gap - total, _GAP_MAX)
            s = self.c.table(t, want)
            total += s
            if s < _GAP_MAX:
                return total
            if total + self.chars > MAX_TEXT_CHARS:
                raise BitstreamError("semantic layer: decoded text over the size limit")

    def _case(self, key: tuple[int, int, int], word: str, case: int | None) -> tuple[int, str]:
        t = self._t(12, _case_prior, *key)
        case = self.c.table(t, case)
        if case == _LOWER:
            return case, word
        if case == _TITLE:
            return case, word[0].upper() + word[1:]
        if case == _UPPER:
            return case, word.upper()
        return case, word  # mixed: the caller codes one bit per letter

    def code_field(self, field: int, text: str | None) -> str:
        """Encode ``text`` (encoder) or decode a field (decoder); returns the field's text."""
        toks = _tokens(text) if text is not None else None
        out: list[str] = []
        prev, prev_g, prev_case = _P_START, _G_START, -1
        k = 0
        while True:
            gap, kind, tok = toks[k] if toks is not None else (None, None, None)
            k += 1
            if kind == _C_WORD and self._slot(tok.lower()) is None:
                kind = _C_SPELL
            ctab = self._t(8, _class_prior, field, prev)
            kind = self.c.table(ctab, kind)
            if kind == _C_END:
                gap = self._gap(prev_g, _G_END, gap)
                out.append(" " * gap)
                self.chars += gap
                return "".join(out)
            if kind == _C_SYM:
                tok = self._symbol(prev, tok)
                new_prev = (_P_STOP if tok in _STOPS else _P_COMMA if tok in _COMMAS
                            else _P_NL if tok == "\n" else _P_DIGIT if tok.isdigit()
                            else _P_APOS if tok in _APOS and prev == _P_WORD else _P_SYM)
            else:
                lower = tok.lower() if tok is not None else None
                if kind == _C_WORD:
                    lower = self._code_word(prev, lower)
                else:
                    lower = self._spell(lower)
                    if self._slot(lower) is not None:
                        raise BitstreamError("semantic layer: corrupt word-model payload (known word spelt)")
                    slot = self._add_word(lower)
                    if slot is not None:
                        self._see(slot)
                start = field != _F_NAME and prev in (_P_START, _P_STOP, _P_NL)
                key = (int(field == _F_NAME), int(start), prev_case)
                case, tok = self._case(key, lower, None if tok is None else _case_of(tok))
                if case == _MIXED:
                    want = None if toks is None else toks[k - 1][2]
                    letters = []
                    for i, ch in enumerate(lower):
                        up = None if want is None else int(want[i].isupper())
                        up = self.c.uniform(2, up)
                        letters.append(ch.upper() if up else ch)
                    tok = "".join(letters)
                prev_case = case
                new_prev = _P_WORD
            cur_g = _gap_class(_C_SYM if kind == _C_SYM else _C_WORD, tok)
            gap = self._gap(prev_g, cur_g, gap)
            out.append(" " * gap)
            out.append(tok)
            self.chars += gap + len(tok)
            if self.chars > MAX_TEXT_CHARS:
                raise BitstreamError("semantic layer: decoded text over the size limit")
            prev, prev_g = new_prev, cur_g

    def _code_word(self, prev: int, lower: str | None) -> str:
        if prev == _P_APOS:
            t = self._t(16, _suffix_prior)
            want = None
            if lower is not None:
                want = _SUFFIXES.index(lower) if lower in _SUFFIXES else len(_SUFFIXES)
            s = self.c.table(t, want)
            if s < len(_SUFFIXES):
                return _SUFFIXES[s]
        slot = self._word_code(None if lower is None else self._slot(lower))
        n = len(self.lex.words)
        word = self.lex.words[slot] if slot < n else self.new_list[slot - n]
        self._see(slot)
        return word


def _wordmodel_encode(lex: _Lexicon, fields: list[str], n_objects: int) -> bytes:
    coder = _Coder()
    model = _WordModel(lex, coder)
    for i, text in enumerate(fields):
        model.code_field(_field_kind(i, n_objects), text)
    return coder.enc.finish()


def _wordmodel_decode(payload: bytes, n_objects: int) -> list[str]:
    lex = _model()
    if lex is None:
        raise BitstreamError("semantic layer: the installed word-model data (wordfreq) differ from "
                             f"model version {MODEL_VERSION}; install wordfreq==3.1.1")
    coder = _Coder(payload)
    model = _WordModel(lex, coder)
    fields = [model.code_field(_field_kind(i, n_objects), None) for i in range(2 * n_objects + 1)]
    coder.dec.check_end()
    return fields


def _field_kind(i: int, n_objects: int) -> int:
    return _F_NAME if i < n_objects else _F_DETAIL if i < 2 * n_objects else _F_CAPTION


# =========================================================================== raw and brotli


def _join(fields: list[str]) -> bytes:
    return "\n".join(f.replace("\\", "\\\\").replace("\n", "\\n") for f in fields).encode("utf-8")


_ESCAPE_RE = re.compile(r"\\(.?)", re.S)


def _split(data: bytes, n_fields: int) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BitstreamError("semantic layer: text is not valid UTF-8") from None
    parts = text.split("\n")
    if len(parts) != n_fields:
        raise BitstreamError(f"semantic layer: {len(parts)} text fields, expected {n_fields}")

    def unescape(m: re.Match[str]) -> str:
        c = m.group(1)
        if c == "n":
            return "\n"
        if c == "\\":
            return "\\"
        raise BitstreamError("semantic layer: bad escape in text")

    return [_ESCAPE_RE.sub(unescape, p) for p in parts]


_MAX_RAW_BYTES = 8 * MAX_TEXT_CHARS + 2 * (2 * MAX_OBJECTS_HARD + 1)  # 4 bytes/char, escapes double


def _brotli_decode(payload: bytes) -> bytes:
    d = brotli.Decompressor()
    out = bytearray()
    try:
        try:
            out += d.process(payload, output_buffer_limit=_MAX_RAW_BYTES + 1)
            while not d.is_finished() and len(out) <= _MAX_RAW_BYTES:
                if d.can_accept_more_data():
                    raise BitstreamError("semantic layer: truncated brotli payload")
                out += d.process(b"", output_buffer_limit=_MAX_RAW_BYTES + 1 - len(out))
        except TypeError:  # brotli < 1.2 has no output limit; the layer size bounds the damage
            out = bytearray(brotli.decompress(payload))
    except brotli.error:
        raise BitstreamError("semantic layer: corrupt brotli payload") from None
    if len(out) > _MAX_RAW_BYTES:
        raise BitstreamError("semantic layer: decoded text over the size limit")
    return bytes(out)


# =========================================================================== public API


def _check_encodable(sem: Semantics) -> list[str]:
    if len(sem.objects) > MAX_OBJECTS_HARD:
        raise SemanticsError(f"{len(sem.objects)} objects; at most {MAX_OBJECTS_HARD} can be coded")
    fields = sem.texts()
    for f in fields:
        if not isinstance(f, str):
            raise SemanticsError(f"semantic text must be strings, not {type(f).__name__}")
        try:
            f.encode("utf-8")
        except UnicodeEncodeError:
            raise SemanticsError("semantic text is not valid Unicode (lone surrogate)") from None
    if sum(map(len, fields)) > MAX_TEXT_CHARS:
        raise SemanticsError(f"semantic text over {MAX_TEXT_CHARS} characters")
    return fields


def encode_candidates(sem: Semantics) -> dict[int, bytes]:
    """Every codec's payload for ``sem`` (the word model's only if it round-trips)."""
    fields = _check_encodable(sem)
    n = len(sem.objects)
    raw = _join(fields)
    out = {pb.CODEC_TEXT_RAW: raw, pb.CODEC_TEXT_BROTLI: brotli.compress(raw, quality=11)}
    lex = _model()
    if lex is not None:
        payload = _wordmodel_encode(lex, fields, n)
        # Belt and braces: a payload that does not decode to the same text is never sent.
        try:
            if _wordmodel_decode(payload, n) == fields:
                out[pb.CODEC_TEXT_WORDMODEL] = payload
        except BitstreamError:
            pass
    return out


def encode_semantic_layer(sem: Semantics) -> tuple[int, pb.SemanticParams, bytes]:
    """(codec, params, payload) of the smallest coding of names, details and caption.

    Boxes are not coded here (the map layer carries them). Ties go to the simpler codec.
    """
    cands = encode_candidates(sem)
    codec = min(cands, key=lambda c: (len(cands[c]), c))
    # model_version is always set (raw and brotli ignore it), so params never depend on the codec
    return codec, pb.SemanticParams(model_version=MODEL_VERSION, objects=len(sem.objects)), cands[codec]


def decode_semantic_layer(codec: int, params: pb.SemanticParams, payload: bytes) -> Semantics:
    """Inverse of encode_semantic_layer (objects come back without boxes).

    Anything corrupt, truncated or of an unknown codec / model version raises BitstreamError.
    """
    n = int(params.objects)
    if n > MAX_OBJECTS_HARD:
        raise BitstreamError(f"semantic layer: {n} objects, at most {MAX_OBJECTS_HARD} allowed")
    payload = bytes(payload)
    if codec == pb.CODEC_TEXT_RAW:
        if len(payload) > _MAX_RAW_BYTES:
            raise BitstreamError("semantic layer: text over the size limit")
        fields = _split(payload, 2 * n + 1)
    elif codec == pb.CODEC_TEXT_BROTLI:
        fields = _split(_brotli_decode(payload), 2 * n + 1)
    elif codec == pb.CODEC_TEXT_WORDMODEL:
        if params.model_version != MODEL_VERSION:
            raise BitstreamError(f"semantic layer: unknown word-model version {params.model_version} "
                                 f"(this build knows {MODEL_VERSION})")
        try:
            fields = _wordmodel_decode(payload, n)
        except BitstreamError:
            raise
        except (IndexError, ValueError, ZeroDivisionError) as e:  # defensive: a corrupt stream is data
            raise BitstreamError(f"semantic layer: corrupt word-model payload ({type(e).__name__})") from None
    else:
        raise BitstreamError(f"semantic layer: unknown codec {codec}")
    if sum(map(len, fields)) > MAX_TEXT_CHARS:
        raise BitstreamError("semantic layer: decoded text over the size limit")
    objects = tuple(SemanticObject(name=fields[i], detail=fields[n + i]) for i in range(n))
    return Semantics(objects=objects, caption=fields[2 * n])
