"""Entropy coding of the semantic layer: names, details and caption in one payload.

MISC counts its text at 8 bits per character. Captions are ordinary English, so a static model of
English words codes them in a fraction of that. The encoder tries three codecs and keeps the
smallest payload:

* ``CODEC_TEXT_RAW``: UTF-8;
* ``CODEC_TEXT_BROTLI``: brotli at quality 11 (its built-in dictionary knows English);
* ``CODEC_TEXT_WORDMODEL``: a word-level model driving an arithmetic (range) coder.

For raw and brotli the fields are joined by ``\\n`` (a backslash and newlines inside a field are
escaped). The word model (version 2) codes fields one after the other, each ended by an END symbol.
A field is tokenised into words (runs of letters: a..z, A..Z and the letters of Latin-1, Latin
Extended-A/B, Greek, Cyrillic and Latin Extended Additional whose lower case maps back), numbers
(runs of up to 12 ASCII digits), single other characters (symbols) and runs of spaces (gaps). Each
token is coded as a class (word in the vocabulary or cache / word to spell / symbol / number / end of
field), then its content, then the number of spaces in front of it, all with contexts chosen so the
common cases cost almost nothing: a space between words, no space before a comma, a capital after a
full stop, "s" after an apostrophe, no space inside 10:45 or 91.25, a closing quote after a word.

A word's lower case is coded from a mixture of integer distributions:

* the static vocabulary: wordfreq 3.1.1's English list, then the common words of its French, German,
  Spanish, Italian, Portuguese, Dutch and Russian lists that English lacks (at 1/64 of their
  frequency there), with boosts for words image descriptions use (data/caption_words.txt) and words
  that name things one can see (data/visual_words.txt, from WordNet 3.0);
* where the previous token is one of the commonest words (or a sentence start, a comma, a number),
  the words that follow it in WordNet 3.0's glosses (data/word_bigrams.txt), the unigram part then
  ranking only the words that list does not name;
* an adaptive cache of the words and numbers sent so far, weighted by how often words were repeats;
* the associates of the content words sent so far (data/word_associations.txt: "bakery" brings
  "pastries" and "cakes");
* the words that followed the previous word earlier in the payload (texts repeat their phrases).

Its case is coded next, in the context of the case the word had the last time. Words outside the
vocabulary are spelt with a letter-trigram model (letters outside a..z from a learned table or as
a code point) and join the cache, as do numbers, coded by length and digits; characters outside
the symbol table are sent as code points once and learned. So any string, of any script,
round-trips exactly.

The range coder is our own (128-bit window, integer frequencies, Python integers) rather than
constriction's: the model is part of the format, so it must be integer arithmetic that no library
release can change, and the coder flushes byte-exactly where a 32-bit-word coder wastes up to 4
bytes per layer. The wide window lets the mixture be coded exactly as products of its parts' totals.

The model depends on wordfreq 3.1.1's data and on the files in data/ (built by the scripts in tools/
from WordNet 3.0, see their docstrings); a checksum of all of it is pinned (MODEL_CHECKSUM), and a
mismatch disables the word model (the encoder falls back to brotli and the decoder refuses such
payloads) instead of silently decoding garbage. Version 1 payloads (the unigram model of before) are
refused with an error naming the version; a change to the model or its data needs a new
MODEL_VERSION. The work one payload can cause is bounded: at most MAX_TEXT_CHARS decoded characters,
_MAX_NEW_WORDS learned words, _FOLLOW_MAX remembered followers per word, and halved caches.
"""

from __future__ import annotations

import array
import bisect
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

MODEL_VERSION = 2  # 1: a unigram word model (no longer decoded); 2: the mixture described above
MAX_TEXT_CHARS = 1 << 16  # decoded text cap: a corrupt layer cannot make us build more than this
# crc32 of the model's data (the vocabulary and its counts from wordfreq 3.1.1 and data/, the follower
# lists, the associations); see _lexicon()
MODEL_CHECKSUM = 3992526208

_CAPTION_WORDS = Path(__file__).with_name("data") / "caption_words.txt"
_VISUAL_WORDS = Path(__file__).with_name("data") / "visual_words.txt"  # built by tools/build_visual_words.py
_BIGRAMS = Path(__file__).with_name("data") / "word_bigrams.txt"  # built by tools/build_word_bigrams.py
_ASSOCIATIONS = Path(__file__).with_name("data") / "word_associations.txt"  # tools/build_word_associations.py


def misc_raw_bytes(sem: Semantics) -> int:
    """MISC's accounting: 8 bits per character of names + details + caption, i.e. bytes = chars."""
    return sem.text_chars()


# =========================================================================== range coder
# A carry-propagating range coder on a 128-bit window (Python integers). Frequencies are integers with a
# total below 2**110, so the range (kept >= 2**120) divided by the total loses at most 2**-10 relative. The
# wide window lets the word model mix several distributions exactly, as products of their totals.

_WINDOW = 16  # bytes
_SHIFT = 8 * (_WINDOW - 1)
_TOP = 1 << (8 * _WINDOW)
_MASK = _TOP - 1
_BOT = 1 << _SHIFT
_MAX_TOTAL = 1 << 110
# The encoder drops at most this many trailing zero bytes (the decoder reads zeros past the end),
# so a decoder that needs more than that past the end knows the payload is truncated or garbage.
_MAX_ZERO_RUN = 24


class _RangeEncoder:
    __slots__ = ("low", "rng", "out")

    def __init__(self) -> None:
        self.low = 0
        self.rng = _MASK
        self.out = bytearray()

    def encode(self, cum: int, freq: int, total: int) -> None:
        assert 0 <= cum and 0 < freq and cum + freq <= total < _MAX_TOTAL
        r = self.rng // total
        self.low += r * cum
        self.rng = r * freq
        if self.low >= _TOP:
            self._carry()
        while self.rng < _BOT:
            self.out.append(self.low >> _SHIFT)
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
            x = -(-self.low // _BOT) * _BOT  # a multiple of _BOT exists because rng >= _BOT
        self.low = x
        if self.low >= _TOP:
            self._carry()
        self.out.append((self.low >> _SHIFT) & 0xFF)
        out = bytes(self.out)
        return out[: max(len(out.rstrip(b"\0")), len(out) - _MAX_ZERO_RUN)]


class _RangeDecoder:
    __slots__ = ("data", "pos", "code", "rng", "r")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = _WINDOW
        self.code = int.from_bytes(data[:_WINDOW].ljust(_WINDOW, b"\0"), "big")  # offset from the window's low
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
            if self.pos > len(self.data) + _MAX_ZERO_RUN + _WINDOW - 2:
                raise BitstreamError("semantic layer: truncated word-model payload")
            b = self.data[self.pos] if self.pos < len(self.data) else 0
            self.pos += 1
            self.code = (self.code << 8) | b
            self.rng <<= 8

    def check_end(self) -> None:
        # The encoder writes one byte per renormalisation plus one; more bytes than that were
        # never written by it.
        if len(self.data) > self.pos - (_WINDOW - 1):
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


# =========================================================================== letters and tokens

# Word letters: a..z, A..Z, and the letters of these blocks whose lower case is one letter that maps
# back (Latin-1, Latin Extended-A and -B, Greek, Cyrillic, Latin Extended Additional). These blocks are
# fully assigned in every Unicode version that Python 3.11+ ships, so encoder and decoder agree on them;
# every other character is a symbol.
_LETTER_BLOCKS = ((0xC0, 0x250), (0x370, 0x500), (0x1E00, 0x1F00))


def _upper(low: str) -> str:
    """The capital of a lower-case letter, or the letter itself where no one-letter capital maps back."""
    up = low.upper()
    return up if len(up) == 1 and up.lower() == low else low


@functools.lru_cache(maxsize=8192)
def _is_letter(ch: str) -> bool:
    o = ord(ch)
    if o < 128:
        return ch.isalpha()
    if not ch.isalpha() or not any(a <= o < b for a, b in _LETTER_BLOCKS):
        return False
    low = ch.lower()
    return len(low) == 1 and (low == ch or (_upper(low) == ch and _is_letter(low)))


def _lower(word: str) -> str:
    return "".join(ch.lower() for ch in word)  # letter by letter: str.lower() knows final sigma


def _lower_word(w: str) -> bool:
    """A word the lexicon may hold: lower-case word letters only."""
    if w.isascii():
        return w.isalpha() and w.islower()
    return all(_is_letter(ch) and ch.lower() == ch for ch in w)


_TOKENS_PER_BYTE = 32  # real texts code one or two tokens per payload byte
_TOKENS_FREE = 256
_MAX_DIGITS = 12  # a longer digit run is coded as several numbers with no space between them

# token classes
_C_WORD, _C_SPELL, _C_SYM, _C_NUM, _C_END = range(5)


def _tokens(text: str) -> list[tuple[int, int, str]]:
    """(gap before, class, text) per token, then (trailing gap, END, '').

    A word is a run of word letters, a number a run of ASCII digits (_C_NUM here; the coder sends a
    number it has seen before as a word), anything else one symbol."""
    out = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] == " ":
            j += 1
        if j == n:
            break
        ch = text[j]
        k = j + 1
        if _is_letter(ch):
            while k < n and _is_letter(text[k]):
                k += 1
            kind = _C_WORD
        elif "0" <= ch <= "9":
            while k < n and k - j < _MAX_DIGITS and "0" <= text[k] <= "9":
                k += 1
            kind = _C_NUM
        else:
            kind = _C_SYM
        out.append((j - i, kind, text[j:k]))
        i = k
    out.append((n - i, _C_END, ""))
    return out


# =========================================================================== static lexicon

_FREQ_SCALE = 1 << 28  # static word counts: frequency * 2**28 (the rarest wordfreq words get 3)
_CAPTION_BOOST = 12  # image-description words are this much likelier than in general text
_VISUAL_BOOST = 3  # and so are words that name things one can see (WordNet's concrete senses)
_FOREIGN = ("fr", "de", "es", "it", "pt", "nl", "ru")  # wordfreq lists whose words join the vocabulary
_FOREIGN_SHIFT = 6  # a word only another language knows: its frequency there / 2**5
_FOREIGN_BUCKETS = 600  # of those lists, the words above frequency 10**-6
_MAX_NEW_WORDS = 1 << 14  # spelt words and numbers that join the cache; later ones are spelt every time
_SPELL_CUTOFF = 700  # letter statistics from words above frequency 10**-7 (the tail is noisy)


@dataclass(frozen=True)
class _Lexicon:
    words: tuple[str, ...]
    index: dict[str, int]
    static: array.array  # count per slot (vocabulary, then zeros for new words); int64
    tree: array.array  # Fenwick tree over ``static``, 1-based; int64
    total: int
    top: int  # highest power of two <= len(static)
    spell: tuple[list[int], ...]  # per context p2 * 28 + p1: cumulative counts of END, a..z, other
    # context (a word's slot, or _CTX_START / _CTX_COMMA / _CTX_NUMBER) -> (followers' slots, ascending;
    # their counts; the counts' sum; the escape count)
    bigrams: dict[int, tuple[tuple[int, ...], tuple[int, ...], int, int]]
    associates: dict[int, tuple[int, ...]]  # slot -> the slots of the words that come with it, strongest first
    checksum: int


def _caption_words(path: Path) -> list[str]:
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for w in line.split("#", 1)[0].split():
            if w.isascii() and w.isalpha() and w.islower():
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


_CTX_START, _CTX_COMMA, _CTX_NUMBER, _CTX_WORD = -1, -2, -3, -4  # bigram contexts that are not one word
_CTX_MARKS = {"<s>": _CTX_START, "<,>": _CTX_COMMA, "<n>": _CTX_NUMBER, "<w>": _CTX_WORD}
_BIGRAM_ESC = (1, 1)  # the escape count is (distinct + unlisted followers) * num / den


def _bigrams(index: dict[str, int]) -> dict[int, tuple[tuple[int, ...], tuple[int, ...], int, int]]:
    out = {}
    for line in _BIGRAMS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        f = line.split(" ")
        ctx = _CTX_MARKS.get(f[0], index.get(f[0]))
        if ctx is None:
            continue
        seen, distinct = int(f[1]), int(f[2])
        pairs = sorted((index[w], int(c)) for w, c in zip(f[3::2], f[4::2], strict=True) if w in index)
        listed = sum(c for _, c in pairs)
        esc = max(1, (distinct + seen - listed) * _BIGRAM_ESC[0] // _BIGRAM_ESC[1])
        out[ctx] = (tuple(s for s, _ in pairs), tuple(c for _, c in pairs), listed, esc)
    return out


def _associations(index: dict[str, int]) -> dict[int, tuple[int, ...]]:
    out = {}
    for line in _ASSOCIATIONS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        f = line.split(" ")
        if f[0] in index:
            out[index[f[0]]] = tuple(index[w] for w in f[1:] if w in index)
    return out


_SPELL_OTHER = 27  # a letter outside a..z: coded next from the learned-letter table
_SPELL_N = 28  # END (0), a..z (1..26), other (27)


def _speller(common: list[str]) -> tuple[list[int], ...]:
    """Cumulative counts of the next letter given the two before it, from the vocabulary's word types.

    Trigram counts interpolated with bigram counts (Witten-Bell: the bigram weighs as much as the number
    of letters seen after the pair), all in integers. After a letter outside a..z the context is as at the
    start of a word."""
    codes = np.frombuffer(("{{" + "{{".join(common) + "{").encode(), dtype=np.uint8).astype(np.int64) - 96
    codes[codes == 27] = 0  # '{' is 123 = 'z' + 1: word boundary (start and END are both 0)
    n = _SPELL_N
    tri = np.bincount((codes[:-2] * n + codes[1:-1]) * n + codes[2:], minlength=n ** 3).reshape(n, n, n)
    tri[0, 0, 0] = 0  # the doubled boundary is not a word
    bi = np.bincount(codes[:-1] * n + codes[1:], minlength=n * n).reshape(n, n)
    bi[0, 0] = 0
    bi = bi * 4 + 1  # every letter possible after every letter
    bi[0, 0] = 1  # an empty word is never sent
    bi_total = bi.sum(axis=1)
    rows = []
    for p2 in range(n):
        for p1 in range(n):
            t = tri[p2, p1]
            distinct = int((t > 0).sum()) + 1
            f = t * int(bi_total[p1]) + bi[p1] * distinct
            f[_SPELL_OTHER] = max(1, int(f.sum()) >> 8)  # about 1 in 256: accented and other letters
            if p1 == 0:
                f[0] = 1  # at the start END is impossible in practice
            rows.append([0] + np.cumsum(f).tolist())
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    """Build the static model once per process (about 1 s, mostly reading wordfreq's lists)."""
    import wordfreq  # imported here: only the word model needs it

    # wordfreq caches every list it reads; reading them past its cache lets the strings we do not keep go
    read = getattr(wordfreq.get_frequency_list, "__wrapped__", wordfreq.get_frequency_list)
    per_bucket = _bucket_counts(800)
    words: list[str] = []
    counts_l: list[int] = []
    seen: set[str] = set()
    ascii_common: list[str] = []
    # English: every word of wordfreq's list; bucket b holds words of frequency 10**(-b/100)
    for b, bucket in enumerate(read("en")):
        for w in bucket:
            if w not in seen and ((w.isascii() and w.isalpha() and w.islower()) or _lower_word(w)):
                seen.add(w)
                words.append(w)
                counts_l.append(per_bucket[b])
                if b < _SPELL_CUTOFF and w.isascii():
                    ascii_common.append(w)
    # other languages: their common words English lacks, much less likely (names, shop signs, menus)
    for lang in _FOREIGN:
        for b, bucket in enumerate(read(lang)[:_FOREIGN_BUCKETS]):
            c = max(1, per_bucket[b] >> _FOREIGN_SHIFT)
            for w in bucket:
                if w not in seen and _lower_word(w):
                    seen.add(w)
                    words.append(w)
                    counts_l.append(c)
    index = dict(zip(words, range(len(words)), strict=True))
    # a learned word's slot keeps a count of 1, so it can always be coded (even after the cache halves)
    counts = np.array(counts_l + [1] * _MAX_NEW_WORDS, dtype=np.int64)
    for path, boost in ((_CAPTION_WORDS, _CAPTION_BOOST), (_VISUAL_WORDS, _VISUAL_BOOST)):
        for w in _caption_words(path):
            i = index.get(w)
            if i is not None:
                counts[i] *= boost
    crc = zlib.crc32("\n".join(words).encode())
    crc = zlib.crc32(counts.astype("<i8").tobytes(), crc)
    crc = zlib.crc32(_BIGRAMS.read_bytes(), crc)
    crc = zlib.crc32(_ASSOCIATIONS.read_bytes(), crc)

    n = len(counts)
    cum = np.concatenate(([0], np.cumsum(counts)))
    pos = np.arange(1, n + 1)
    tree = np.concatenate(([0], cum[pos] - cum[pos - (pos & -pos)]))
    return _Lexicon(
        words=tuple(words), index=index, static=array.array("q", counts.tobytes()),
        tree=array.array("q", tree.astype(np.int64).tobytes()),
        total=int(cum[-1]), top=1 << (n.bit_length() - 1), spell=_speller(ascii_common),
        bigrams=_bigrams(index), associates=_associations(index), checksum=crc,
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

# field kinds
_F_NAME, _F_DETAIL, _F_CAPTION = range(3)
# what came before, for the class and case contexts
_P_START, _P_WORD, _P_STOP, _P_COMMA, _P_APOS, _P_NL, _P_DIGIT, _P_SYM, _P_NUMSEP = range(9)
_NUM_SEPS = ":.,"  # right after a number with no space: a time, a decimal, thousands (_P_NUMSEP)
# cases
_LOWER, _TITLE, _UPPER, _MIXED = range(4)

_SYMBOLS = (
    ".,'-\n:;!?\"()/&%+*=#@$[]{}<>_~`^|\\\t"
    "\u2019\u2018\u201c\u201d\u2014\u2013\u2026\u00b0\u00d7\u20ac\u00a3\u00a5"
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
_G_START, _G_WORD, _G_CLOSE, _G_OPEN, _G_QUOTE, _G_DASH, _G_NL, _G_DIGIT, _G_OTHER, _G_END, _G_NUMSEP = range(11)

# The word distribution mixes, with integer weights (see _WordModel._word_code):
#   PS(w) = S(w) / T, the static counts S (total T); or, where the previous token has a list of followers
#           W (total L, escape esc = (distinct + unlisted followers) * _BIGRAM_ESC):
#           W(w) / (L + esc) for a listed word, esc / (L + esc) * S(w) / (T - S(listed)) for the others;
#   P1(w) = (ws * PS(w) + wc * c(w) / n + wa * A(w) / m) / (ws + wc + wa), c(w) the word's count in the
#           cache of words sent so far (total n, halved when it reaches _CACHE_MAX), ws = _CACHE_MISS0 +
#           misses and wc = _CACHE_HIT0 + hits counting how often the words sent so far were (hits) or
#           were not (misses) already in the cache, A(w) the associates' count (total m, each new content
#           word adding _ASSOC_TOP - rank to each of its associates; halved past _ASSOC_MAX), wa =
#           _ASSOC_WEIGHT;
#   P(w)  = (_SUCC_K * a_p(w) + _SUCC_D * d_p * P1(w)) / (_SUCC_K * A_p + _SUCC_D * d_p) when the
#           previous word p has been followed by others in this payload: a_p(w) how often w followed p so
#           far (total A_p, d_p distinct followers): texts repeat their phrases.
_CACHE_MAX = 2048
_CACHE_HIT0 = 1
_CACHE_MISS0 = 3
_CACHE_HALVE = 256  # hits + misses are halved past this, so the weight follows the text
_SUCC_K = 1
_SUCC_D = 2
_ASSOC_WEIGHT = 1
_ASSOC_TOP = 14
_ASSOC_MAX = 1 << 15
_FOLLOW_MAX = 64  # distinct followers remembered per word (bounds the work per word)


def _gap_class(kind: int, text: str) -> int:
    if kind == _C_END:
        return _G_END
    if kind == _C_NUM:
        return _G_DIGIT
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
    return _G_OTHER


def _gap_prior(prev: int, cur: int) -> list[int]:
    """Hand-set starting counts for the number of spaces between two token classes."""
    likely = 1  # one space, unless a rule below says otherwise
    strong = 60
    if prev == _G_NUMSEP:
        likely, strong = (0, 30) if cur == _G_DIGIT else (1, 30)
    elif cur in (_G_END, _G_CLOSE, _G_NL) or prev in (_G_START, _G_OPEN, _G_NL):
        likely = 0
    elif prev == _G_DASH or cur == _G_DASH:
        likely, strong = 0, 12
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


_FUNCTION_WORDS = 120  # the most frequent English words: after them a symbol or the end is rare


_RUN_BUCKETS = (0, 1, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5)  # words since the last stop -> a context bucket


def _class_prior(field: int, prev: int, func: bool, run: int) -> list[int]:
    """Starting counts for (word, spell, symbol, number, end) given the field, what came before, whether
    it was a function word, and how many words the sentence has so far (bucketed; the priors ignore it)."""
    if func:
        return [80, 3, 2, 4, 1]
    if prev == _P_START:
        return [60, 2, 3, 2, 1]
    if prev == _P_WORD:
        return {_F_NAME: [24, 1, 2, 1, 24], _F_DETAIL: [70, 2, 12, 3, 2], _F_CAPTION: [70, 2, 12, 3, 1]}[field]
    if prev == _P_STOP:
        return {_F_NAME: [2, 1, 2, 1, 20], _F_DETAIL: [6, 1, 2, 1, 40], _F_CAPTION: [40, 2, 4, 2, 8]}[field]
    if prev == _P_APOS:
        return [40, 2, 4, 1, 2]
    if prev == _P_COMMA:
        return [40, 2, 4, 3, 1]
    if prev == _P_DIGIT:
        return [16, 2, 30, 1, 3]
    if prev == _P_NUMSEP:
        return [8, 1, 4, 60, 2]
    return [30, 2, 10, 4, 4]


def _symbol_prior(prev: int) -> list[int]:
    """Starting counts for the symbol table (plus 'other') given what came before."""
    prior = [1] * (len(_SYMBOLS) + 1)
    if prev == _P_WORD:
        for c, n in ((".", 40), (",", 50), ("'", 6), ("-", 10), (":", 3), (";", 2), (")", 3),
                     ("!", 2), ("?", 1), ("\u2019", 3), ("\n", 2), ('"', 6)):
            prior[_SYM_INDEX[c]] = n
    elif prev == _P_DIGIT:
        for c, n in ((".", 10), (",", 10), ("%", 3), ("-", 3), (":", 6), ("\u2013", 2), ("\u00b0", 2)):
            prior[_SYM_INDEX[c]] = n
    elif prev == _P_START:
        for c, n in (('"', 4), ("(", 2), ("-", 3), ("\u201c", 2)):
            prior[_SYM_INDEX[c]] = n
    else:
        for c, n in (("\n", 6), ('"', 4), (")", 3), ("(", 2), ("-", 3)):
            prior[_SYM_INDEX[c]] = n
    prior[_SYM_OTHER] = 2
    return prior


def _suffix_prior() -> list[int]:
    return [40, 6, 4, 4, 4, 4, 4, 8]  # _SUFFIXES, then "another word"


def _case_prior(name: int, start: int, prev_case: int, last: int) -> list[int]:
    if last >= 0:  # the case this word had last time
        prior = [2, 2, 1, 1]
        prior[last] = 40 if last != _LOWER or not start else 8
        if start and last == _LOWER:
            prior[_TITLE] = 30
        return prior
    if name:
        return [8, 40, 2, 1] if prev_case != _LOWER else [30, 8, 1, 1]
    if start:
        return [3, 50, 2, 1]
    if prev_case == _TITLE:
        return [30, 12, 1, 1]
    return [80, 4, 1, 1]


def _case_of(word: str, low: str) -> int:
    ups = [a != b for a, b in zip(word, low, strict=True)]
    if not any(ups):
        return _LOWER
    if ups[0] and not any(ups[1:]):
        return _TITLE
    cased = [_upper(ch) != ch for ch in low]
    if sum(cased) >= 2 and ups == cased:
        return _UPPER
    return _MIXED


def _length_prior(sep: str) -> list[int]:
    """Starting counts of a number's length (1.._MAX_DIGITS digits) given the separator right before it."""
    if sep == ":":
        return [2, 60, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # 10:45
    if sep == ".":
        return [12, 20, 8, 4, 1, 1, 1, 1, 1, 1, 1, 1]  # 91.25, 45.000
    if sep == ",":
        return [4, 12, 30, 2, 1, 1, 1, 1, 1, 1, 1, 1]  # 83,000, 1.299,00
    return [30, 24, 14, 24, 6, 4, 3, 2, 1, 1, 1, 1]


def _digit_prior(length: int, place: int, first: int) -> list[int]:
    """Starting counts of a digit given the number's length, its place (0 = first) and the first digit."""
    if place == 0:
        if length == 4:
            return [1, 30, 30, 2, 2, 2, 2, 2, 2, 2]  # years
        return [2 if length == 1 else 1, 8, 6, 5, 4, 4, 3, 3, 3, 3]
    if place == 1 and length == 4 and first in (1, 2):
        return [2, 2, 2, 2, 2, 2, 2, 2, 10, 40] if first == 1 else [40, 8, 10, 2, 2, 2, 2, 2, 2, 2]
    return [8, 4, 4, 4, 4, 6, 4, 4, 4, 4]


_COMMON_LETTERS = (  # starting counts of the learned-letter table: letters of European names and words
    ("é", 12), ("è", 4), ("ê", 3), ("ë", 2), ("à", 4), ("á", 5), ("â", 2), ("ä", 5), ("ã", 3), ("å", 3),
    ("ç", 3), ("ñ", 4), ("ö", 5), ("ó", 5), ("ò", 2), ("ô", 3), ("õ", 2), ("ø", 3), ("ü", 6), ("ú", 3),
    ("ù", 1), ("û", 1), ("í", 4), ("ì", 1), ("î", 2), ("ï", 2), ("ý", 1), ("ÿ", 1), ("æ", 2), ("œ", 1),
    ("ß", 3), ("ł", 2), ("ś", 1), ("ź", 1), ("ż", 1), ("ń", 1), ("ą", 1), ("ę", 1), ("č", 2), ("š", 2),
    ("ž", 2), ("ř", 1), ("ě", 1), ("ů", 1), ("ő", 1), ("ű", 1), ("ğ", 1), ("ş", 1), ("ā", 2), ("ē", 1),
    ("ī", 1), ("ō", 3), ("ū", 2), ("ạ", 1), ("ả", 1), ("ố", 1), ("ộ", 1), ("ơ", 1), ("ư", 1), ("đ", 1),
)


def _fenwick_add(tree: dict[int, int], size: int, slot: int, c: int) -> int:
    """Add ``c`` at ``slot`` to a sparse Fenwick tree (1-based nodes) over ``size`` slots; returns ``c``."""
    i = slot + 1
    while i <= size:
        tree[i] = tree.get(i, 0) + c
        i += i & -i
    return c


class _WordModel:
    """The adaptive state shared by encoder and decoder; ``code_field`` walks one field."""

    def __init__(self, lex: _Lexicon, coder: _Coder) -> None:
        self.lex = lex
        self.c = coder
        self.tables: dict[tuple, _Table] = {}
        self.cache: dict[int, int] = {}  # Fenwick nodes of the cache counts (sparse)
        self.cache_freq: dict[int, int] = {}  # slot -> cache count
        self.n = 0  # cache total
        self.hits = 0  # words sent that were in the cache already
        self.misses = 0  # and that were not
        self.succ: dict[int, dict[int, int]] = {}  # slot -> {following slot: count}
        self.assoc: dict[int, int] = {}  # slot -> association count
        self.assoc_tree: dict[int, int] = {}  # its Fenwick nodes (sparse)
        self.assoc_n = 0
        self.assoc_seen: set[int] = set()
        self.last_case: dict[int, int] = {}  # slot -> the case it was sent in last
        self.new_words: dict[str, int] = {}
        self.new_list: list[str] = []
        self.learned = _Table([1], inc=24)  # learned symbols, entry 0 = a new one
        self.learned_chars: list[str] = []
        # letters of words outside a..z: entry 0 = a new one, then the common ones, then those learned
        self.letters = _Table([6] + [c for _, c in _COMMON_LETTERS], inc=24)
        self.letter_list: list[str] = [ch for ch, _ in _COMMON_LETTERS]
        self.chars = 0
        # a decoder codes at most this many tokens: a junk payload cannot make it decode a well-predicted
        # word until MAX_TEXT_CHARS (an encoder whose text needs more falls back to brotli)
        self.max_tokens = None if coder.encoding else _TOKENS_PER_BYTE * len(coder.dec.data) + _TOKENS_FREE
        self.tokens = 0

    # ---- tables by context
    def _t(self, inc: int, prior, *key) -> _Table:
        """The adaptive table for context ``key``, created from ``prior(*key)`` on first use."""
        t = self.tables.get((prior, *key))
        if t is None:
            t = self.tables[(prior, *key)] = _Table(prior(*key), inc)
        return t

    # ---- the word distribution: static counts, a sparse cache and the followers of the previous word
    def _word_code(self, ctx: int | None, prev_slot: int | None, slot: int | None) -> int:
        lex = self.lex
        st, ct, at = lex.tree, self.cache, self.assoc_tree
        sf, cf, af = lex.static, self.cache_freq, self.assoc
        # PS: the static counts S (total T), or where the previous token has a list of followers W (total
        # L, escape count esc): PS(w) = W(w) / (L + esc) for a listed follower, else
        # esc / (L + esc) * S(w) / (T - S(listed)): the unigram part only ranks the words the list does not name
        a, sparse, total_s = 1, {}, lex.total  # PS's weights: a * S(w) + sparse[w], total total_s
        bg = None
        if ctx is not None:
            bg = lex.bigrams.get(ctx)
            if bg is None and ctx >= 0:
                bg = lex.bigrams.get(_CTX_WORD)
        if bg is not None:
            b_slots, b_counts, listed, esc = bg
            rest = lex.total - sum(sf[s] for s in b_slots)
            a = esc
            sparse = {s: c * rest - esc * sf[s] for s, c in zip(b_slots, b_counts, strict=True)}
            total_s = (listed + esc) * rest
        # P1 = (ws * PS(w) + wc * c(w) / n + wa * A(w) / m) / (ws + wc + wa): the cache c of the words sent
        # (total n) and the associates A of the content words sent (total m)
        ws = _CACHE_MISS0 + self.misses
        wc = _CACHE_HIT0 + self.hits if self.n else 0
        wa = _ASSOC_WEIGHT if self.assoc_n else 0
        n, m = max(self.n, 1), max(self.assoc_n, 1)
        k = ws * n * m
        a *= k
        sparse = {s: c * k for s, c in sparse.items()}
        b, e = wc * total_s * m, wa * total_s * n
        total = (ws + wc + wa) * total_s * n * m
        follow = self.succ.get(prev_slot) if prev_slot is not None else None
        if follow:  # P2 = (K a_p(w) + d_p P1(w)) / (K A_p + d_p)
            d = len(follow) * _SUCC_D
            a, b, e = a * d, b * d, e * d
            sparse = {s: c * d for s, c in sparse.items()}
            k_total = _SUCC_K * total
            for s, c in follow.items():
                sparse[s] = sparse.get(s, 0) + c * k_total
            total *= _SUCC_K * sum(follow.values()) + d
        f_slots = sorted(sparse)
        f_cum = [0]
        for s in f_slots:
            f_cum.append(f_cum[-1] + sparse[s])

        def freq_of(x: int) -> int:
            f = a * sf[x] + b * cf.get(x, 0) + e * af.get(x, 0)
            k = bisect.bisect_left(f_slots, x)
            if k < len(f_slots) and f_slots[k] == x:
                f += f_cum[k + 1] - f_cum[k]
            return f

        if self.c.encoding:
            assert slot is not None
            cs = cc = ca = 0
            i = slot
            while i > 0:
                cs += st[i]
                cc += ct.get(i, 0)
                ca += at.get(i, 0)
                i -= i & -i
            cum = a * cs + b * cc + e * ca + f_cum[bisect.bisect_left(f_slots, slot)]
            self.c.enc.encode(cum, freq_of(slot), total)
            return slot
        v = self.c.dec.target(total)
        pos, rem, step, size = 0, v, lex.top, len(sf)
        lo_k = 0  # sparse entries below pos
        while step:
            nxt = pos + step
            if nxt <= size:
                hi_k = bisect.bisect_left(f_slots, nxt, lo_k)
                t = a * st[nxt] + b * ct.get(nxt, 0) + e * at.get(nxt, 0) + f_cum[hi_k] - f_cum[lo_k]
                if t <= rem:
                    pos = nxt
                    rem -= t
                    lo_k = hi_k
            step >>= 1
        freq = freq_of(pos) if pos < size else 0
        if freq <= 0:
            raise BitstreamError("semantic layer: corrupt word-model payload")
        self.c.dec.consume(v - rem, freq)
        return pos

    def _see(self, prev_slot: int | None, slot: int) -> None:
        """Count a word just sent: captions repeat the objects' names, their own words and phrases, and
        name things that go together."""
        if self.n:
            if slot in self.cache_freq:
                self.hits += 1
            else:
                self.misses += 1
            if self.hits + self.misses > _CACHE_HALVE:
                self.hits >>= 1
                self.misses >>= 1
        if self.n >= _CACHE_MAX:  # halve, so long texts keep adapting and totals stay bounded
            self.cache_freq, self.cache, self.n = self._halved(self.cache_freq)
        self.n += _fenwick_add(self.cache, len(self.lex.static), slot, 1)
        self.cache_freq[slot] = self.cache_freq.get(slot, 0) + 1
        assoc = self.lex.associates.get(slot)
        if assoc and slot not in self.assoc_seen:
            self.assoc_seen.add(slot)
            if self.assoc_n >= _ASSOC_MAX:
                self.assoc, self.assoc_tree, self.assoc_n = self._halved(self.assoc)
            for rank, s in enumerate(assoc[:_ASSOC_TOP]):
                self.assoc[s] = self.assoc.get(s, 0) + _ASSOC_TOP - rank
                self.assoc_n += _fenwick_add(self.assoc_tree, len(self.lex.static), s, _ASSOC_TOP - rank)
        if prev_slot is not None:
            follow = self.succ.setdefault(prev_slot, {})
            c = follow.get(slot, 0)
            if c < _CACHE_MAX and (c or len(follow) < _FOLLOW_MAX):
                follow[slot] = c + 1

    def _halved(self, counts: dict[int, int]) -> tuple[dict[int, int], dict[int, int], int]:
        """(halved counts, their Fenwick nodes, their total)."""
        half = {k: c // 2 for k, c in counts.items() if c >= 2}
        tree: dict[int, int] = {}
        total = sum(_fenwick_add(tree, len(self.lex.static), k, c) for k, c in sorted(half.items()))
        return half, tree, total

    def _slot(self, word: str) -> int | None:
        i = self.lex.index.get(word)
        if i is None:
            i = self.new_words.get(word)
        return i

    def _word(self, slot: int) -> str:
        n = len(self.lex.words)
        if slot < n:
            return self.lex.words[slot]
        if slot - n >= len(self.new_list):
            raise BitstreamError("semantic layer: corrupt word-model payload (a word not learned yet)")
        return self.new_list[slot - n]

    def _spell(self, word: str | None) -> str:
        """A lower-case word letter by letter: a..z from the trigram speller, others from the learned
        letters (or as a new code point)."""
        spell = self.lex.spell
        letters: list[str] = []
        p2 = p1 = 0
        i = 0
        while True:
            want = None
            if word is not None:
                if i == len(word):
                    want = 0
                else:
                    ch = word[i]
                    want = ord(ch) - 96 if "a" <= ch <= "z" else _SPELL_OTHER
            s = self.c.static(spell[p2 * _SPELL_N + p1], want)
            if s == 0:
                break
            if s == _SPELL_OTHER:
                letters.append(self._other_letter(None if word is None else word[i]))
                s = 0  # the next letter is predicted as at a word's start
            else:
                letters.append(chr(96 + s))
            i += 1
            p2, p1 = p1, s
            if len(letters) + self.chars > MAX_TEXT_CHARS:
                raise BitstreamError("semantic layer: decoded text over the size limit")
        if not letters:
            raise BitstreamError("semantic layer: corrupt word-model payload (empty word)")
        return "".join(letters)

    def _other_letter(self, ch: str | None) -> str:
        want = None
        if ch is not None:
            want = self.letter_list.index(ch) + 1 if ch in self.letter_list else 0
        k = self.c.table(self.letters, want)
        if k > 0:
            return self.letter_list[k - 1]
        cp = None if ch is None else ord(ch)
        hi = self.c.uniform(0x2000 >> 7, None if cp is None else cp >> 7)  # letters lie below U+2000
        lo = self.c.uniform(128, None if cp is None else cp & 127)
        new = chr((hi << 7) | lo)
        if new.isascii() or not _is_letter(new) or new != new.lower() or new in self.letter_list:
            raise BitstreamError("semantic layer: corrupt word-model payload (bad letter)")
        self.letter_list.append(new)
        self.letters.append(24)
        return new

    def _number(self, sep: str, digits: str | None) -> str:
        t = self._t(16, _length_prior, sep)
        length = self.c.table(t, None if digits is None else len(digits) - 1) + 1
        out = []
        first = 0
        for place in range(length):
            t = self._t(12, _digit_prior, length, min(place, 2), first if place == 1 else 0)
            d = self.c.table(t, None if digits is None else ord(digits[place]) - 48)
            if place == 0:
                first = d
            out.append(chr(48 + d))
        return "".join(out)

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
        if ch == " " or ch in _SYM_INDEX or ch in self.learned_chars or _is_letter(ch) or "0" <= ch <= "9":
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

    def _cased(self, key: tuple[int, int, int, int], low: str, tok: str | None) -> tuple[int, str]:
        t = self._t(12, _case_prior, *key)
        case = self.c.table(t, None if tok is None else _case_of(tok, low))
        if case == _LOWER:
            return case, low
        if case == _TITLE:
            return case, _upper(low[0]) + low[1:]
        if case == _UPPER:
            return case, "".join(_upper(ch) for ch in low)
        letters = []  # mixed: one bit per letter that has a capital
        for i, ch in enumerate(low):
            up = _upper(ch)
            if up == ch:
                letters.append(ch)
                continue
            bit = self.c.uniform(2, None if tok is None else int(tok[i] != ch))
            letters.append(up if bit else ch)
        return case, "".join(letters)

    def code_field(self, field: int, text: str | None) -> str:
        """Encode ``text`` (encoder) or decode a field (decoder); returns the field's text."""
        toks = _tokens(text) if text is not None else None
        out: list[str] = []
        prev, prev_g, prev_case = _P_START, _G_START, -1
        run = 0  # words since the field's start or the last full stop
        quote_open = False  # a '"' opens a quote when none is open, else closes it
        sep = ""  # the separator of _P_NUMSEP
        prev_slot: int | None = None  # the previous token's slot when it was a word or a number
        k = 0
        while True:
            gap, kind, tok = toks[k] if toks is not None else (None, None, None)
            k += 1
            self.tokens += 1
            if self.max_tokens is not None and self.tokens > self.max_tokens:
                raise BitstreamError("semantic layer: word-model payload decodes to more tokens than its size allows")
            low = None
            if kind in (_C_WORD, _C_NUM):
                low = _lower(tok) if kind == _C_WORD else tok
                if self._slot(low) is not None:
                    kind = _C_WORD
                elif kind == _C_WORD:
                    kind = _C_SPELL
            # after a function word ("the", "of", "with") a symbol or the end is rare
            func = prev == _P_WORD and prev_slot is not None and prev_slot < _FUNCTION_WORDS
            ctab = self._t(8, _class_prior, field, prev, func, _RUN_BUCKETS[min(run, len(_RUN_BUCKETS) - 1)])
            kind = self.c.table(ctab, kind)
            if kind == _C_END:
                gap = self._gap(prev_g, _G_END, gap)
                out.append(" " * gap)
                self.chars += gap
                return "".join(out)
            slot = None
            if kind == _C_SYM:
                tok = self._symbol(prev, tok)
                new_prev = (_P_STOP if tok in _STOPS else _P_COMMA if tok in _COMMAS
                            else _P_NL if tok == "\n" else _P_APOS if tok in _APOS and prev == _P_WORD
                            else _P_SYM)
                cur_g = _gap_class(_C_SYM, tok)
                if tok == '"':  # an opening quote follows a space, a closing one a word
                    cur_g = _G_CLOSE if quote_open else _G_OPEN
                    new_prev = _P_WORD if quote_open else _P_SYM
                    quote_open = not quote_open
            else:
                if kind == _C_WORD:
                    low, slot = self._code_word(field, prev, prev_slot, low)
                elif kind == _C_SPELL:
                    low = self._spell(low)
                    if self._slot(low) is not None:
                        raise BitstreamError("semantic layer: corrupt word-model payload (known word spelt)")
                    slot = self._add_word(low)
                else:
                    low = self._number(sep if prev == _P_NUMSEP else "", low)
                    if self._slot(low) is not None:
                        raise BitstreamError("semantic layer: corrupt word-model payload (known number spelt)")
                    slot = self._add_word(low)
                if slot is not None and kind != _C_WORD:
                    self._see(prev_slot, slot)
                if "0" <= low[0] <= "9":
                    tok = low
                    new_prev, cur_g = _P_DIGIT, _G_DIGIT
                else:
                    start = field != _F_NAME and prev in (_P_START, _P_STOP, _P_NL)
                    last = -1 if slot is None else self.last_case.get(slot, -1)
                    key = (int(field == _F_NAME), int(start), prev_case, last)
                    case, tok = self._cased(key, low, tok)
                    if slot is not None:
                        self.last_case[slot] = case
                    prev_case = case
                    new_prev, cur_g = _P_WORD, _G_WORD
            gap = self._gap(prev_g, cur_g, gap)
            if kind == _C_SYM and prev == _P_DIGIT and gap == 0 and tok in _NUM_SEPS:
                new_prev, cur_g, sep = _P_NUMSEP, _G_NUMSEP, tok
            out.append(" " * gap)
            out.append(tok)
            self.chars += gap + len(tok)
            if self.chars > MAX_TEXT_CHARS:
                raise BitstreamError("semantic layer: decoded text over the size limit")
            prev, prev_g, prev_slot = new_prev, cur_g, slot
            run = 0 if prev in (_P_STOP, _P_NL) else run + (prev == _P_WORD)

    def _code_word(self, field: int, prev: int, prev_slot: int | None, low: str | None) -> tuple[str, int | None]:
        # names and details start with a content word ("Red barn"), not like a sentence
        start = prev in (_P_STOP, _P_NL) or (prev == _P_START and field == _F_CAPTION)
        ctx = (_CTX_START if start else None if prev == _P_START else _CTX_COMMA if prev == _P_COMMA
               else _CTX_NUMBER if prev == _P_DIGIT else prev_slot if prev == _P_WORD else None)
        if prev == _P_APOS:
            t = self._t(16, _suffix_prior)
            want = None
            if low is not None:
                want = _SUFFIXES.index(low) if low in _SUFFIXES else len(_SUFFIXES)
            s = self.c.table(t, want)
            if s < len(_SUFFIXES):
                return _SUFFIXES[s], None
        slot = self._word_code(ctx, prev_slot, None if low is None else self._slot(low))
        self._see(prev_slot, slot)
        return self._word(slot), slot


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
            known = "no longer decoded" if 0 < params.model_version < MODEL_VERSION else "unknown"
            raise BitstreamError(f"semantic layer: word-model version {params.model_version} is {known} "
                                 f"(this build decodes version {MODEL_VERSION})")
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
