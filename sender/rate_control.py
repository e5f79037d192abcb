"""Rate control of the pixel layer: the settings with the best picture that fit a byte budget.

Generic over the registered codecs (miscnet.core.pixel): a codec either has its quality searched on each
raster of a geometric ladder (``quality_search``: the thumbnail codecs), or lists its candidates with
sizes known without encoding (the block codec). Only the sender runs this; receivers never import it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

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
from miscnet.core.pixel.block import MISC_BLOCKS, MISC_STEP

SCORE_MAX_SIDE = 1536  # rate control measures PSNR at full size up to this long side (see _Search)
_QUALITY_LADDER = (10, 30, 50, 70, 90)  # the coarse grid of candidate_settings for quality-searched codecs
_RASTER_RATIO = 2 ** 0.25


def raster_ladder(width: int, height: int, smallest: int = 8, largest: int = 512) -> list[tuple[int, int]]:
    """Rasters with the image's aspect, short side on a geometric ladder from ``smallest`` up to
    half the image's short side (or ``largest``)."""
    short = min(width, height)
    lo = min(smallest, short)
    hi = max(lo, min(short // 2, largest))
    out: list[tuple[int, int]] = []
    s = float(lo)
    while True:
        side = min(hi, round(s))
        f = side / short
        r = (max(1, min(MAX_RASTER, round(width * f))), max(1, min(MAX_RASTER, round(height * f))))
        if not out or r != out[-1]:
            out.append(r)
        if side >= hi:
            return out
        s *= _RASTER_RATIO


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
    rasters = raster_ladder(width, height, smallest=c.ladder_smallest)
    if not c.quality_search:
        return c.candidates(rasters, levels)
    return [PixelSettings(codec, w, h, quality=q, levels=levels) for w, h in rasters for q in _QUALITY_LADDER]


class _Search:
    """Encodes and scores candidates for one image, remembering what it already tried."""

    def __init__(self, image: np.ndarray) -> None:
        self.scratch = Scratch()  # what codecs derive from the image once (the thumbnails' down-sampled targets)
        self.image = image
        self.encoded: dict[PixelSettings, list[PixelLevel]] = {}
        self.scores: dict[PixelSettings, float] = {}
        # Scoring decodes every candidate at full size. Above SCORE_MAX_SIDE the PSNR is taken at that
        # size instead: rasters stop at 512 px, three times smaller, so what the smaller reference drops
        # is detail that no candidate carries; the ranking stays the same at a fraction of the time.
        h, w = image.shape[:2]
        if max(w, h) > SCORE_MAX_SIDE:
            f = SCORE_MAX_SIDE / max(w, h)
            self.score_size = (max(1, round(w * f)), max(1, round(h * f)))
            self.reference = np.asarray(Image.fromarray(image).resize(self.score_size, DOWN_FILTER))
        else:
            self.score_size, self.reference = (w, h), image

    def encode(self, s: PixelSettings) -> list[PixelLevel]:
        if s not in self.encoded:
            self.encoded[s] = check_settings(s).encode(self.image, s, self.scratch)
        return self.encoded[s]

    def size(self, s: PixelSettings) -> int:
        n = s.nbytes_hint
        return n if n is not None else payload_bytes(self.encode(s))

    def score(self, s: PixelSettings) -> float:
        if s not in self.scores:
            self.scores[s] = psnr(decode_pixels(self.encode(s), *self.score_size), self.reference)
        return self.scores[s]


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


def _best_under_budget(search: _Search, codec: str, levels: int, max_bytes: int):
    """(psnr, settings) of the best point of one codec under the budget, and the smallest size seen."""
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
    ladder = raster_ladder(w, h, smallest=c.ladder_smallest)
    fitted: dict[int, tuple[float, PixelSettings] | None] = {}
    prior: dict[int, int] = {}

    def evaluate(i: int) -> tuple[float, PixelSettings] | None:
        nonlocal smallest, prior
        if i not in fitted:
            rw, rh = ladder[i]

            def size(q: int) -> int:
                return search.size(PixelSettings(codec, rw, rh, quality=q, levels=levels))

            low = size(1)
            smallest = low if smallest is None else min(smallest, low)
            if low > max_bytes:
                fitted[i] = None
            else:
                q, prior = _fit_quality(size, max_bytes, prior)
                s = PixelSettings(codec, rw, rh, quality=q, levels=levels)
                fitted[i] = (search.score(s), s)
        return fitted[i]

    # PSNR against the raster (each at the best quality that fits) rises, peaks and falls: walk every
    # other raster up to the first that cannot fit, then climb from the best one through its neighbours.
    for i in range(0, len(ladder), 2):
        if evaluate(i) is None:
            break
    scored = {i: r for i, r in fitted.items() if r is not None}
    if not scored:
        evaluate(1) if len(ladder) > 1 else None
        scored = {i: r for i, r in fitted.items() if r is not None}
        if not scored:
            return None, smallest
    best_i = max(scored, key=lambda i: scored[i][0])
    while True:
        moved = False
        for j in (best_i - 1, best_i + 1):
            if 0 <= j < len(ladder):
                r = evaluate(j)
                if r is not None and r[0] > fitted[best_i][0]:
                    best_i, moved = j, True
        if not moved:
            return fitted[best_i], smallest


def _fit_quality(
    size: Callable[[int], int], budget: int, prior: dict[int, int]
) -> tuple[int, dict[int, int]]:
    """Largest quality in 1..100 whose size fits ``budget`` (quality 1 must fit), and the sizes seen.

    The size-quality curve of one raster looks like the previous raster's shifted in log-size, so
    ``prior`` (the previous raster's samples) predicts a first guess; a widening probe brackets the
    answer and bisection finishes it. Sizes are (nearly) monotone in quality.
    """
    seen = {1: size(1)}

    def probe(q: int) -> bool:
        if q not in seen:
            seen[q] = size(q)
        return seen[q] <= budget

    guess = 50
    if len(prior) > 1 and 1 in prior:
        target = math.log(budget) - math.log(seen[1]) + math.log(prior[1])
        pts = sorted((q, math.log(b)) for q, b in prior.items())
        guess = pts[-1][0]
        for (q0, l0), (q1, l1) in zip(pts, pts[1:], strict=False):
            if l1 > target:  # the shifted curve crosses the budget between q0 and q1
                guess = q0 + int((q1 - q0) * (target - l0) / (l1 - l0)) if l1 > l0 else q0
                break
    lo, hi = 1, 101  # size(lo) fits, size(hi) does not (101: past the end)
    q, step = min(100, max(2, guess)), 3
    if probe(q):
        lo = q
        while lo < 100:
            q = min(100, lo + step)
            if not probe(q):
                hi = q
                break
            lo, step = q, step * 2
        if lo == 100:
            return 100, seen
    else:
        hi = q
        while hi - lo > 1:
            q = max(lo + 1, hi - step)
            if probe(q):
                lo = q
                break
            hi, step = q, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, seen


def choose_settings(image: np.ndarray, codec: str, levels: int, max_bytes: int
                    ) -> tuple[PixelSettings, list[PixelLevel]]:
    """The settings with the best full-size PSNR whose levels total at most ``max_bytes`` bytes.

    For each raster on the ladder, binary-search the largest quality that fits, then keep the raster
    whose decoded image scores best. ``codec`` may be "auto" (every thumbnail codec).
    """
    check_image(image)
    codecs = auto_codec_names() if codec == "auto" else (codec,)
    most = min((_selectable(c).max_levels for c in codecs), default=0)
    if not (isinstance(levels, int) and 1 <= levels <= most):
        raise MiscError(f"pixel layer: levels must be 1..{most} for {codec}")
    search = _search_for(image)
    best = None
    smallest = None
    for c in codecs:
        found, low = _best_under_budget(search, c, levels, max_bytes)
        if low is not None:
            smallest = low if smallest is None else min(smallest, low)
        if found and (best is None or found[0] > best[0]):
            best = found
    search.scratch.shrink()  # the cache keeps small things only
    if best is None:
        raise BudgetError(
            f"pixel layer: no {codec} setting fits {max_bytes} bytes (the smallest is {smallest} bytes)"
        )
    return best[1], search.encode(best[1])


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
        for rw, rh in raster_ladder(w, h, smallest=c.ladder_smallest):
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
