"""Rate control of the pixel layer: the settings with the best picture that fit a byte budget.

Generic over the registered codecs (miscnet.core.pixel): a codec either has its quality searched on each
raster of a geometric ladder (``quality_search``: the thumbnail codecs), or lists its candidates with
sizes known without encoding (the block codec). Only the sender runs this; receivers never import it.

The thumbnail codecs search what a standard file of the same bytes may use (experiments/baselines.py):
every raster of the image's aspect up to its own size, every quality, and AVIF's 4:4:4 chroma. The quick
search (the default) ranks rasters with the codec's proxy encoder, fits and climbs with its draft encoder
(sized as the real one by one measured ratio), and encodes the winner for real; ``exhaustive`` encodes
every candidate for real (experiments/bench_levels.py compares the two).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import Image

from miscnet.core.errors import BudgetError, MiscError
from miscnet.core.pixel import (
    DOWN_FILTER,
    MAX_RASTER,
    PixelCodec,
    PixelLevel,
    PixelSettings,
    Scratch,
    auto_codec_names,
    codec_names,
    decode_pixels,
    lookup,
    payload_bytes,
    psnr,
)
from miscnet.core.pixel.base import check_image, check_settings
from miscnet.core.pixel.block import MISC_BLOCKS, MISC_STEP, misc_rule_settings
from miscnet.core.pixel.imaging import UP_FILTER, to_uint8
from miscnet.core.pixel.ref import read_ref_file
from miscnet.core.pixel.thumbnail import ThumbnailCodec, thumbnail_targets

SCORE_MAX_SIDE = 1536  # rate control measures PSNR at full size up to this long side (see _Search)
PREVIEW_SCORE_SIDE = 256  # ... and the previews' PSNR at most at this one
_QUALITY_LADDER = (10, 30, 50, 70, 90)  # the coarse grid of candidate_settings for quality-searched codecs
_RASTER_RATIO = 2 ** 0.25
# The full-size ladder's step: the baselines' (experiments/baselines.py), so that rate control can reach
# every raster a standard file of the same bytes may use.
_FULL_RASTER_RATIO = 2 ** (1 / 6)


def raster_ladder(width: int, height: int, smallest: int = 8, largest: int = 512, full_size: bool = False
                  ) -> list[tuple[int, int]]:
    """Rasters with the image's aspect, short side on a geometric ladder from ``smallest`` up to
    half the image's short side (or ``largest``); with ``full_size``, up to the image's own size (its
    last raster) in finer steps, clamped to MAX_RASTER."""
    short = min(width, height)
    lo = min(smallest, short)
    hi = short if full_size else max(lo, min(short // 2, largest))
    ratio = _FULL_RASTER_RATIO if full_size else _RASTER_RATIO
    out: list[tuple[int, int]] = []
    s = float(lo)
    while True:
        side = min(hi, round(s))
        f = side / short
        r = (width, height) if side >= short else (round(width * f), round(height * f))
        r = (max(1, min(MAX_RASTER, r[0])), max(1, min(MAX_RASTER, r[1])))
        if not out or r != out[-1]:
            out.append(r)
        if side >= hi:
            return out
        s *= ratio


def codec_ladder(codec: PixelCodec, width: int, height: int) -> list[tuple[int, int]]:
    """The raster ladder rate control searches for one codec."""
    return raster_ladder(width, height, smallest=codec.ladder_smallest, full_size=codec.ladder_full_size)


def misc_block_settings(width: int, height: int, blocks: int = MISC_BLOCKS, step: int = MISC_STEP,
                        levels: int = 1) -> PixelSettings:
    """MISC's faithful pixel mode: ``blocks`` blocks on the short side, aspect kept, RGB, step 8."""
    f = min(blocks, min(width, height)) / min(width, height)
    w, h = max(1, round(width * f)), max(1, round(height * f))
    return PixelSettings("block", w, h, step=step, levels=levels)


def _selectable(codec: str) -> PixelCodec:
    """The registered codec a MISC encoder may choose under this name; MiscError otherwise."""
    c = lookup(codec)
    if c is None or not c.selectable:
        raise MiscError(f"pixel layer: unknown codec {codec!r} (use auto or one of {', '.join(codec_names())})")
    return c


def candidate_settings(width: int, height: int, codec: str, levels: int = 1) -> list[PixelSettings]:
    """A coarse grid of settings, from the smallest / worst to the largest / best.

    Quality-searched codecs (the thumbnails): every ladder raster times a few qualities (choose_settings
    searches quality finely); the others (block: ladder grids times quantisation steps) list their own
    candidates, ordered by their exact size.
    """
    if codec == "auto":
        return [s for c in auto_codec_names() for s in candidate_settings(width, height, c, levels)]
    c = _selectable(codec)
    rasters = codec_ladder(c, width, height)
    if not c.quality_search:
        return c.candidates(rasters, levels)
    return [PixelSettings(codec, w, h, quality=q, levels=levels, chroma=ch) for w, h in rasters
            for ch in c.chroma_options for q in _QUALITY_LADDER]


class _Search:
    """Encodes and scores candidates for one image, remembering what it already tried."""

    def __init__(self, image: np.ndarray, score_side: int = SCORE_MAX_SIDE, parent: _Search | None = None) -> None:
        self.image = image
        # what codecs derive from the image once (the thumbnails' down-sampled targets), the encodes and the
        # proxy encodes do not depend on how candidates are scored: a parent's are shared
        self.scratch = Scratch() if parent is None else parent.scratch
        self.encoded: dict[PixelSettings, list[PixelLevel]] = {} if parent is None else parent.encoded
        self.proxies: dict[tuple[str, str], dict] = {} if parent is None else parent.proxies
        self.scores: dict[PixelSettings, float] = {}
        self.proxy_scores: dict[tuple, float] = {}  # (codec, chroma, raster, quality) -> the proxy's PSNR
        self.drafts: dict[PixelSettings, list] = {}  # the quick search's draft encodes: [size, payload, psnr]
        self.grey = bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))
        self._previews: _Search | None = None
        # Scoring decodes every candidate at full size. Above ``score_side`` the PSNR is taken at that
        # size instead: what the smaller reference drops is detail that hardly any candidate carries
        # (rasters that large need budgets of tens of kB), and the ranking stays the same at a fraction
        # of the time.
        h, w = image.shape[:2]
        if max(w, h) > score_side:
            f = score_side / max(w, h)
            self.score_size = (max(1, round(w * f)), max(1, round(h * f)))
            self.reference = np.asarray(Image.fromarray(image).resize(self.score_size, DOWN_FILTER))
        else:
            self.score_size, self.reference = (w, h), image

    def for_previews(self) -> _Search:
        """The search the preview levels are chosen by: the same encodes, scored at PREVIEW_SCORE_SIDE (a
        preview of a few dozen bytes is a few dozen pixels wide; its ranking needs no more)."""
        if self._previews is None:
            self._previews = _Search(self.image, PREVIEW_SCORE_SIDE, parent=self)
        return self._previews

    def encode(self, s: PixelSettings) -> list[PixelLevel]:
        if s not in self.encoded:
            self.encoded[s] = check_settings(s).encode(self.image, s, self.scratch)
        return self.encoded[s]

    def levels(self, s: PixelSettings) -> list[PixelLevel]:
        """The levels of ``s``; with previews, made of the single levels already encoded (every level is
        coded on its own, so the bytes are those ``encode`` would give)."""
        if not s.previews:
            return self.encode(s)
        singles = [PixelSettings(s.codec, w, h, quality=q) for w, h, q in s.previews]
        singles.append(PixelSettings(s.codec, s.width, s.height, quality=s.quality, chroma=s.chroma))
        return [replace(self.encode(one)[0], level=k) for k, one in enumerate(singles)]

    def targets(self):
        """The thumbnail codecs' down-sampled targets of this image (shared with their encodes)."""
        return thumbnail_targets(self.image, self.scratch)

    def size(self, s: PixelSettings) -> int:
        n = s.nbytes_hint
        return n if n is not None else payload_bytes(self.encode(s))

    def score(self, s: PixelSettings) -> float:
        if s not in self.scores:
            self.scores[s] = psnr(decode_pixels(self.encode(s), *self.score_size), self.reference)
        return self.scores[s]

    def score_thumbnail(self, recon: np.ndarray) -> float:
        """PSNR of a decoded uint8 thumbnail, up-sampled as the receiver does."""
        return psnr(np.asarray(Image.fromarray(recon).resize(self.score_size, UP_FILTER)), self.reference)

    def target(self, width: int, height: int) -> np.ndarray:
        """The uint8 thumbnail the thumbnail codecs code at this raster."""
        key = ("rate_control.uint8", width, height)
        if key not in self.scratch:
            self.scratch[key] = to_uint8(self.targets().get(width, height))
        return self.scratch[key]

    def draft_size(self, c: ThumbnailCodec, s: PixelSettings) -> int:
        """Payload size of the codec's draft encode of single-level settings (the real one where it has none)."""
        d = self.drafts.get(s)
        if d is None:
            payload = c.draft_thumbnail(self.target(s.width, s.height), s.quality, s.chroma)
            d = self.drafts[s] = [self.size(s) if payload is None else len(payload), payload, None]
        return d[0]

    def draft_score(self, c: ThumbnailCodec, s: PixelSettings) -> float:
        self.draft_size(c, s)
        d = self.drafts[s]
        if d[2] is None:
            d[2] = self.score(s) if d[1] is None else \
                self.score_thumbnail(c.decode_thumbnail(d[1], s.width, s.height, s.quality))
        return d[2]


_SEARCH_CACHE: list[tuple[bytes, _Search]] = []


def clear_search_cache() -> None:
    """Forget the last image's search (benchmarks time a cold encode with this)."""
    _SEARCH_CACHE.clear()


def _search_for(image: np.ndarray) -> _Search:
    """The search state of the last image seen: a caller that retries with a smaller budget (the
    encoder corrects for framing bytes this way) reuses every encode already made."""
    key = hashlib.blake2b(image.tobytes(), digest_size=16).digest() + repr(image.shape).encode()
    for k, search in _SEARCH_CACHE:
        if k == key:
            return search
    search = _Search(image)
    _SEARCH_CACHE[:] = [(key, search)]
    return search


def _best_under_budget(search: _Search, codec: str, levels: int, max_bytes: int, exhaustive: bool = True,
                       preview: bool = False):
    """(psnr, settings) of the best point of one codec under the budget, and the smallest size seen.

    ``exhaustive``: every raster and chroma option is encoded for real. Otherwise the rasters are ranked
    by the codec's quicker proxy encoder and only the winner is encoded for real (``_fast``).
    ``preview``: a preview level's search, the codec's first chroma option only (preview settings do not
    record one) and, when quick, a lighter one (see ``_fast``).
    """
    h, w = search.image.shape[:2]
    c = lookup(codec)
    best = None
    smallest = None
    if not c.quality_search:
        fits: dict[tuple[int, int], PixelSettings] = {}
        for s in candidate_settings(w, h, codec, levels):
            n = c.exact_bytes(s)
            smallest = n if smallest is None else min(smallest, n)
            if n <= max_bytes:
                # sorted by size: the last fit per raster is the best (block: the finest step)
                fits[(s.width, s.height)] = s
        for s in fits.values():
            cand = (search.score(s), s)
            best = cand if best is None or cand[0] > best[0] else best
        return best, smallest
    ladder = codec_ladder(c, w, h)
    if not exhaustive and isinstance(c, ThumbnailCodec):  # the codecs with a proxy encoder
        found = _fast(search, c, ladder, levels, max_bytes, preview)
        if found is not None:
            return found, None
    for chroma in c.chroma_options[:1] if preview else c.chroma_options:
        found, low = _ladder_search(ladder, lambda i, ch=chroma: _fit_raster(search, codec, ladder[i], levels,
                                                                            max_bytes, ch))
        if low is not None:
            smallest = low if smallest is None else min(smallest, low)
        if found is not None and (best is None or found[0] > best[0]):
            best = found
    return best, smallest


def _fit_raster(search: _Search, codec: str, raster: tuple[int, int], levels: int, max_bytes: int,
                chroma: str = "420"):
    """((psnr, settings) at the best quality that fits on this raster, or None; size at quality 1)."""
    rw, rh = raster

    def size(q: int) -> int:
        return search.size(PixelSettings(codec, rw, rh, quality=q, levels=levels, chroma=chroma))

    low = size(1)
    if low > max_bytes:
        return None, low
    q, _ = _fit_quality(size, max_bytes, {})
    s = PixelSettings(codec, rw, rh, quality=q, levels=levels, chroma=chroma)
    return (search.score(s), s), low


def _ladder_search(ladder: list[tuple[int, int]], evaluate: Callable[[int], tuple]):
    """The best point over a raster ladder: (psnr, settings) or None, and the smallest size seen.

    PSNR against the raster (each at the best quality that fits) rises, peaks and falls: walk every
    other raster up to the first that cannot fit, then climb from the best one through its neighbours.
    """
    fitted: dict[int, tuple | None] = {}
    smallest = None

    def at(i: int):
        nonlocal smallest
        if i not in fitted:
            fitted[i], low = evaluate(i)
            smallest = low if smallest is None else min(smallest, low)
        return fitted[i]

    for i in range(0, len(ladder), 2):
        if at(i) is None:
            break
    scored = {i: r for i, r in fitted.items() if r is not None}
    if not scored:
        at(1) if len(ladder) > 1 else None
        scored = {i: r for i, r in fitted.items() if r is not None}
        if not scored:
            return None, smallest
    best_i = max(scored, key=lambda i: scored[i][0])
    while True:
        moved = False
        for j in (best_i - 1, best_i + 1):
            if 0 <= j < len(ladder):
                r = at(j)
                if r is not None and r[0] > fitted[best_i][0]:
                    best_i, moved = j, True
        if not moved:
            return fitted[best_i], smallest


class _Proxy:
    """The codec's proxy encoder on one ladder and chroma option: ``fits_low(i)`` (quality 1 fits) and
    ``evaluate(i)`` for the ladder searches: ((proxy psnr, raster) or None, size at quality 1), the
    quality that fits left in ``predicted``."""

    def __init__(self, search: _Search, c: ThumbnailCodec, ladder: list[tuple[int, int]], max_bytes: int,
                 chroma: str) -> None:
        self.search, self.c, self.ladder, self.max_bytes, self.chroma = search, c, ladder, max_bytes, chroma
        self.proxies = search.proxies.setdefault((c.name, chroma), {})  # raster -> quality -> (payload, size)
        self.predicted: dict[int, int] = {}
        self.results: dict[int, tuple] = {}

    def size(self, i: int, q: int) -> int:
        raster = self.ladder[i]
        seen = self.proxies.setdefault(raster, {})
        if q not in seen:
            same = self.c.canonical_quality(q)
            if same not in seen:
                seen[same] = self.c.proxy_thumbnail(self.search.target(*raster), same, self.chroma)
            seen[q] = seen[same]
        return seen[q][1]

    def fits_low(self, i: int) -> bool:
        return self.size(i, 1) <= self.max_bytes

    def evaluate(self, i: int):
        if i in self.results:
            return self.results[i]
        low = self.size(i, 1)
        if low > self.max_bytes:
            self.results[i] = (None, low)
            return self.results[i]
        raster = self.ladder[i]
        # the nearest raster already fitted predicts this one's curve (fewer probes)
        tried = [k for k in self.predicted if len(self.proxies.get(self.ladder[k], ())) > 1]
        near = self.proxies[self.ladder[min(tried, key=lambda k: abs(k - i))]] if tried else {}
        q, _ = _fit_quality(lambda q: self.size(i, q), self.max_bytes, {k: n for k, (_, n) in near.items()})
        self.predicted[i] = q
        key = (self.c.name, self.chroma, raster, self.c.canonical_quality(q))
        if key not in self.search.proxy_scores:  # searches of other budgets meet the same points
            recon = self.c.decode_thumbnail(self.proxies[raster][q][0], *raster, q)
            self.search.proxy_scores[key] = self.search.score_thumbnail(recon)
        self.results[i] = ((self.search.proxy_scores[key], raster), low)
        return self.results[i]


PEAK_FALL_DB = 0.6  # the proxy's descent stops this far under the best PSNR it has seen
PREVIEW_FALL_DB = 0.3  # ... for a preview, whose choice matters less
PEAK_TIE_DB = 0.15


def _proxy_peak(proxy: _Proxy, fall_db: float = PEAK_FALL_DB) -> int | None:
    """The ladder index where the proxy's PSNR peaks, or None when nothing fits.

    PSNR against the raster (each at the best quality that fits) rises, peaks and falls, with bumps of a
    few tenths of a dB where the quality steps are coarse (the proxy's largest at the largest rasters). The
    largest raster that fits at quality 1 is found by bisection; the search then descends two rasters at
    a time until the PSNR is ``fall_db`` under the best seen, and settles between the best one's
    neighbours.
    """
    n = len(proxy.ladder)
    if not proxy.fits_low(0):
        return None
    lo, hi = 0, n  # fits_low(lo); hi: n or a raster that does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if proxy.fits_low(mid) else (lo, mid)

    def score(i: int) -> float:
        r = proxy.evaluate(i)[0]
        return -math.inf if r is None else r[0]

    best, i = lo, lo
    while i >= 2 and score(i) > score(best) - fall_db:
        i -= 2
        best = i if score(i) > score(best) else best
    while True:
        j = max((k for k in (best - 1, best + 1) if 0 <= k < n), key=score, default=best)
        if score(j) <= score(best):
            break
        best = j
    # The proxy's PSNR is noisy by a few tenths where the curve is flat (it can overrate the largest
    # rasters): the smallest raster within PEAK_TIE_DB of the best is where the drafts start (and climb).
    return min((i for i in proxy.results if i <= best and score(i) >= score(best) - PEAK_TIE_DB), default=best)


def largest_fitting(fits: Callable[[int], bool], n: int, hint: int = 0, verify_steps: int = 0) -> int | None:
    """The largest index i < n with fits(i), None when none fits, for a ``fits`` that is monotone (true, then
    false) up to wiggles of at most ``verify_steps`` steps: a galloping bisection from ``hint`` (a good hint
    costs two tries), then a scan of ``verify_steps`` indices past the edge. The baselines' search
    (experiments/baselines.py) uses it with wiggles; the encoder's quality search without."""
    hint = min(max(hint, 0), n - 1)
    if fits(hint):
        lo, step = hint, 1
        while lo + step < n and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(n, lo + step)  # hi: n, or an index that does not fit
    else:
        hi, step = hint, 1
        while hi - step >= 0 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = hi - step
        if lo < 0:
            lo = next((i for i in range(min(n, verify_steps + 1)) if fits(i)), None)
            if lo is None:
                return None
            hi = max(hi, lo + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    j = lo + 1
    while j < n and j - lo <= verify_steps:
        if fits(j):
            lo = j
        j += 1
    return lo


def _largest_quality(fits: Callable[[int], bool], guess: int, upward: bool = True) -> int | None:
    """The largest quality in 1..100 that fits, searched from ``guess`` (``largest_fitting``); None when
    quality 1 does not fit. Without ``upward``, a guess that fits is taken as it is (one try)."""
    q = min(100, max(1, guess))
    if not upward and fits(q):
        return q
    i = largest_fitting(lambda i: fits(i + 1), 100, q - 1)
    return None if i is None else i + 1


CHROMA_MARGIN_DB = 0.3  # a chroma option the proxy scores this much under the first is not drafted


def _fast(search: _Search, c: ThumbnailCodec, ladder: list[tuple[int, int]], levels: int, max_bytes: int,
          preview: bool = False):
    """Rate control with few slow encodes; None when no raster fits (the exhaustive search then says
    what the smallest size is). ``levels`` is 1 (previews are searched as single levels).

    Three encoders of the codec, quickest first. The proxy (``proxy_thumbnail``) finds the raster where
    its PSNR peaks (``_proxy_peak``) and predicts the quality that fits on each raster within a step or
    two; it scores large rasters low (it lacks the slow tools), so the real peak lies at or above its
    peak. Draft encodes (``draft_thumbnail``: the real tools, quicker settings) fit the largest quality
    on the rasters from there and climb while their PSNR rises; a second chroma option is drafted where
    the proxy does not rule it out (never for a grey image). The real encoder then fits the quality on
    the draft's best raster only.
    """
    base = c.chroma_options[0]
    proxy = _Proxy(search, c, ladder, max_bytes, base)
    peak = _proxy_peak(proxy, PREVIEW_FALL_DB if preview else PEAK_FALL_DB)
    if peak is None:
        return None
    if preview:  # a preview of a few dozen bytes: the real encode on the proxy's raster
        s = PixelSettings(c.name, *ladder[peak], quality=c.canonical_quality(proxy.predicted[peak]), chroma=base)
        q = _largest_quality(lambda q: search.size(replace(s, quality=c.canonical_quality(q))) <= max_bytes,
                             s.quality)
        if q is None:
            return None
        s = replace(s, quality=c.canonical_quality(q))
        return search.score(s), s

    def drafted(p: _Proxy):
        found: dict[int, tuple[float, PixelSettings] | None] = {}
        offset = 0  # the draft's quality minus the proxy's, as last seen: the next guess

        def fit(i: int):
            nonlocal offset
            if i not in found:
                found[i] = None
                if 0 <= i < len(ladder) and p.evaluate(i)[0] is not None:
                    def at(q: int) -> PixelSettings:
                        return PixelSettings(c.name, *ladder[i], quality=c.canonical_quality(q), chroma=p.chroma)

                    q = _largest_quality(lambda q: search.draft_size(c, at(q)) * scale <= max_bytes,
                                         p.predicted[i] + offset)
                    if q is not None:
                        offset = q - p.predicted[i]
                        found[i] = (search.draft_score(c, at(q)), at(q))
            return found[i]

        return fit

    # The real encode's size over the draft's, measured once where the drafts start (at the draft's fitted
    # quality): the drafts are then fitted again to the bytes the real encoder will take (their sizes differ
    # by 5 to 15 % either way, and by more at the lowest qualities).
    scale = 1.0
    fit = drafted(proxy)
    best_i = next((i for i in range(peak, -1, -1) if fit(i)), None)
    if best_i is None:
        return None
    d = fit(best_i)[1]
    if search.draft_size(c, d) != search.size(d):  # the codec has drafts: measure, and fit again
        scale = search.size(d) / search.draft_size(c, d)
        fit = drafted(proxy)
        best_i = next((i for i in range(best_i, -1, -1) if fit(i)), None)
        if best_i is None:
            return None
    # The climb goes up only: the proxy undervalues the larger rasters, and its peak is the smallest of the
    # rasters it scores about alike; quality steps make the curve bumpy, so it looks two rasters ahead.
    while True:
        ahead = [j for j in (best_i + 1, best_i + 2) if (r := fit(j)) is not None and r[0] > fit(best_i)[0]]
        if not ahead:
            break
        best_i = ahead[0]
    best = fit(best_i)
    options = () if preview or search.grey else c.chroma_options[1:]
    for option in options:
        other = _Proxy(search, c, ladder, max_bytes, option)
        mine, theirs = proxy.evaluate(best_i)[0], other.evaluate(best_i)[0]
        if theirs is None or mine is None or theirs[0] < mine[0] - CHROMA_MARGIN_DB:
            continue
        fit_other = drafted(other)
        for i in (best_i, best_i - 1):  # the costlier chroma peaks on the same raster or the one below
            r = fit_other(i)
            if r is not None and r[0] > best[0]:
                best = r
    s = best[1]
    while True:
        def real(q: int, s: PixelSettings = s) -> PixelSettings:
            return replace(s, quality=c.canonical_quality(q))

        q = _largest_quality(lambda q: search.size(real(q)) <= max_bytes, s.quality)
        if q is not None:
            return search.score(real(q)), real(q)
        i = ladder.index((s.width, s.height))  # the real encode is larger than the draft even at quality 1
        if i == 0:
            return None
        s = replace(s, width=ladder[i - 1][0], height=ladder[i - 1][1], quality=1)


def _fit_quality(
    size: Callable[[int], int], budget: int, prior: dict[int, int]
) -> tuple[int, dict[int, int]]:
    """Largest quality in 1..100 whose size fits ``budget`` (quality 1 must fit), and the sizes seen.

    The size-quality curve of one raster looks like the previous raster's shifted in log-size, so
    ``prior`` (the previous raster's samples) predicts a first guess; a galloping probe brackets the
    answer and bisection finishes it (``_largest_quality``). Sizes are (nearly) monotone in quality.
    """
    seen = {1: size(1)}

    def probe(q: int) -> bool:
        if q not in seen:
            seen[q] = size(q)
        return seen[q] <= budget

    # without a prior: sizes grow about 4 % a quality step from quality 1 (AVIF and WebP at these sizes)
    guess = round(math.log(max(1.0, budget / max(1, seen[1]))) / 0.04) if seen[1] <= budget else 1
    if len(prior) > 1 and 1 in prior:
        target = math.log(budget) - math.log(seen[1]) + math.log(prior[1])
        pts = sorted((q, math.log(b)) for q, b in prior.items())
        guess = pts[-1][0]
        for (q0, l0), (q1, l1) in zip(pts, pts[1:], strict=False):
            if l1 > target:  # the shifted curve crosses the budget between q0 and q1
                guess = q0 + int((q1 - q0) * (target - l0) / (l1 - l0)) if l1 > l0 else q0
                break
    return _largest_quality(probe, guess) or 1, seen


PREVIEW_SHARE = 0.04  # the last preview level's share of the pixel budget up to PREVIEW_SHARE_BYTES
PREVIEW_SHARE_BYTES = 1000  # above, the preview grows with the square root of the budget (its share falls)


def preview_budgets(levels: int, max_bytes: int) -> list[int]:
    """Bytes for each level before the last (each earlier one has half the next one's): small, so that the
    last level is nearly a single level's. A preview is a first look, which a few dozen bytes give at any
    budget: above PREVIEW_SHARE_BYTES its bytes grow as the square root of the budget (80 B of 4000 B)."""
    last = PREVIEW_SHARE * (max_bytes if max_bytes <= PREVIEW_SHARE_BYTES else
                            math.sqrt(max_bytes * PREVIEW_SHARE_BYTES))
    return [int(last / 2 ** (levels - 2 - k)) for k in range(levels - 1)]


PREVIEW_FLOOR = 4  # a preview is first searched in 1/PREVIEW_FLOOR of its share (see _best_levels) ...
PREVIEW_FLOOR_BYTES = 24  # ... or in this many bytes, where the share is larger (an 8 x 8 AVIF takes about 15)


def _best_preview(search: _Search, codec: str, budget: int, exhaustive: bool):
    """(psnr, settings) of the best single-level preview in ``budget`` bytes, else the smallest preview
    there is; None, and its size, when not even that fits."""
    found, low = _best_under_budget(search, codec, 1, budget, exhaustive, preview=True)
    if found is None and low:  # too small a share: the smallest preview there is
        found, _ = _best_under_budget(search, codec, 1, low, exhaustive, preview=True)
    return found, low


def _best_levels(search: _Search, codec: str, levels: int, max_bytes: int, exhaustive: bool):
    """Like _best_under_budget, for any number of levels. Thumbnail codecs send small previews first,
    each a picture of its own (see miscnet.core.pixel.thumbnail); the last level gets what is left.

    The last level's quality comes in steps (libaom's quantisers are 5 to 10 % apart in bytes at these
    sizes), so it seldom fills its budget to the byte. The previews are therefore searched in a quarter of
    their shares first, the last level gets the rest, and the last preview then takes what the last level
    left over, up to its whole share: the previews keep about their share on average, and the last level
    loses only the quarter to them."""
    c = lookup(codec)
    if levels == 1 or not c.quality_search:
        return _best_under_budget(search, codec, levels, max_bytes, exhaustive)
    shares = preview_budgets(levels, max_bytes)
    previews: list[PixelSettings] = []
    for share in shares:
        floor = max(share // PREVIEW_FLOOR, min(share, PREVIEW_FLOOR_BYTES), 1)
        found, low = _best_preview(search.for_previews(), codec, floor, exhaustive)
        if found is None:
            return None, low
        previews.append(found[1])
    used = sum(search.size(p) for p in previews)
    final, low = _best_under_budget(search, codec, 1, max_bytes - used, exhaustive)
    if final is None:
        return None, None if low is None else low + used
    room = min(shares[-1], max_bytes - search.size(final[1]) - sum(search.size(p) for p in previews[:-1]))
    last = previews[-1]
    if room > search.size(last):  # the last preview's raster at the largest quality that now fits
        canonical = getattr(c, "canonical_quality", lambda q: q)
        q = _largest_quality(lambda q: search.size(replace(last, quality=canonical(q))) <= room, last.quality)
        previews[-1] = replace(last, quality=canonical(q or last.quality))
    return (final[0], replace(final[1], levels=levels, previews=tuple((p.width, p.height, p.quality)
                                                                       for p in previews))), None


def predicted_codecs(codecs: tuple[str, ...]) -> tuple[str, ...]:
    """The automatic choice without a search over codecs: AVIF where it is registered, else every one.

    At these sizes AVIF's intra coding beats WebP's and JPEG's almost everywhere; experiments/bench_levels.py
    measures what the prediction (with the quick raster search) costs against the exhaustive search.
    """
    return tuple(c for c in codecs if c == "avif") or codecs


def choose_settings(image: np.ndarray, codec: str, levels: int, max_bytes: int, exhaustive: bool = False
                    ) -> tuple[PixelSettings, list[PixelLevel]]:
    """The settings with the best full-size PSNR whose levels total at most ``max_bytes`` bytes.

    For each raster on the ladder, binary-search the largest quality that fits, then keep the raster
    whose decoded image scores best. ``codec`` may be "auto" (the thumbnail codecs). By default the
    search is quick (the predicted codec; rasters ranked by proxy encodes); ``exhaustive`` tries every
    auto codec and encodes every raster for real.
    """
    check_image(image)
    codecs = auto_codec_names() if codec == "auto" else (codec,)
    most = min((_selectable(c).max_levels for c in codecs), default=0)
    if not (isinstance(levels, int) and 1 <= levels <= most):
        raise MiscError(f"pixel layer: levels must be 1..{most} for {codec}")
    if codec == "auto" and not exhaustive:
        codecs = predicted_codecs(codecs)
    search = _search_for(image)
    best = None
    smallest = None
    for c in codecs:
        found, low = _best_levels(search, c, levels, max_bytes, exhaustive)
        if low is not None:
            smallest = low if smallest is None else min(smallest, low)
        if found and (best is None or found[0] > best[0]):
            best = found
    search.scratch.shrink()  # the cache keeps small things only
    if best is None:
        raise BudgetError(
            f"pixel layer: no {codec} setting fits {max_bytes} bytes (the smallest is {smallest} bytes)"
        )
    return best[1], search.levels(best[1])


def settings_for_psnr(image: np.ndarray, codec: str, levels: int, min_psnr: float
                      ) -> tuple[PixelSettings, list[PixelLevel], float] | None:
    """The fewest-bytes settings whose full-size PSNR reaches ``min_psnr`` (None if none does).

    For each raster, binary-search the lowest quality that reaches the PSNR (PSNR is nearly monotone
    in quality) and keep the cheapest; stop once even the lowest quality costs more than the best.
    """
    check_image(image)
    c = _selectable(codec)
    h, w = image.shape[:2]
    search = _Search(image)
    best: tuple[int, PixelSettings] | None = None
    if not c.quality_search:
        for s in candidate_settings(w, h, codec, levels):
            n = c.exact_bytes(s)
            if best is not None and n >= best[0]:
                break
            if search.score(s) >= min_psnr:
                best = (n, s)
    else:
        for rw, rh in codec_ladder(c, w, h):
            def at(q: int, rw: int = rw, rh: int = rh) -> PixelSettings:
                return PixelSettings(codec, rw, rh, quality=q, levels=levels)

            if best is not None and search.size(at(1)) >= best[0]:
                break
            if search.score(at(100)) < min_psnr:
                continue
            lo, hi = 1, 100
            while lo < hi:
                mid = (lo + hi) // 2
                if search.score(at(mid)) >= min_psnr:
                    hi = mid
                else:
                    lo = mid + 1
            n = search.size(at(lo))
            if best is None or n < best[0]:
                best = (n, at(lo))
    if best is None:
        return None
    return best[1], search.encode(best[1]), search.score(best[1])


def choose_for_config(image: np.ndarray, config, max_bytes: int | None, exhaustive: bool = False
                      ) -> tuple[PixelSettings, list[PixelLevel]]:
    """The pixel levels an EncoderConfig asks for, in at most ``max_bytes`` bytes (None: no budget).

    ``--pixel ref``: the external codec's file as its one level, counted in full; ``--pixel block
    --block-rule misc``: the notebook's fixed grid and step. Neither has anything to trade for bytes, so
    a budget they miss is a BudgetError; everything else is ``choose_settings``'s search (which needs
    ``max_bytes``)."""
    check_image(image)
    h, w = image.shape[:2]
    if config.pixel_codec == "ref":
        levels = read_ref_file(config.ref, w, h)
        n = payload_bytes(levels)
        if max_bytes is not None and n > max_bytes:
            raise BudgetError(f"pixel layer: the ref file {config.ref} is {n} bytes, over the {max_bytes} "
                              "bytes left for it")
        p = levels[0].params
        return PixelSettings("ref", p.width, p.height), levels
    if config.pixel_codec == "block" and config.block_rule == "misc":
        s = misc_rule_settings(w, h, config.levels)
        check_settings(s)
        n = s.nbytes_hint
        if max_bytes is not None and n > max_bytes:
            raise BudgetError(f"pixel layer: the notebook's block rule needs {n} bytes ({s.width}x{s.height} "
                              f"blocks, step {s.step}), over the {max_bytes} bytes left for it")
        return s, check_settings(s).encode(image, s)
    if max_bytes is None:
        raise MiscError("pixel layer: rate control needs a byte budget")
    return choose_settings(image, config.pixel_codec, config.levels, max_bytes, exhaustive)
