"""Rate control of the pixel layer: the settings with the best picture that fit a byte budget.

Generic over the registered codecs (miscnet.core.pixel): a codec either has its quality searched on each
raster of a geometric ladder (``quality_search``: the thumbnail codecs), or lists its candidates with
sizes known without encoding (the block codec). Only the sender runs this; receivers never import it.
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
        self.proxies: dict[str, dict] = {}  # the quick search's proxy encodes, per codec (see _fast)
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

    def levels(self, s: PixelSettings) -> list[PixelLevel]:
        """The levels of ``s``; with previews, made of the single levels already encoded (every level is
        coded on its own, so the bytes are those ``encode`` would give)."""
        if not s.previews:
            return self.encode(s)
        singles = [PixelSettings(s.codec, w, h, quality=q) for w, h, q in s.previews]
        singles.append(PixelSettings(s.codec, s.width, s.height, quality=s.quality))
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


def _best_under_budget(search: _Search, codec: str, levels: int, max_bytes: int, exhaustive: bool = True):
    """(psnr, settings) of the best point of one codec under the budget, and the smallest size seen.

    ``exhaustive``: every raster is encoded for real (what rate control always did). Otherwise the rasters
    are ranked by the codec's quicker proxy encoder and only the winner is encoded for real (``_fast``).
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
    ladder = raster_ladder(w, h, smallest=c.ladder_smallest)
    if not exhaustive and isinstance(c, ThumbnailCodec):  # the codecs with a proxy encoder
        found = _fast(search, c, ladder, levels, max_bytes)
        if found is not None:
            return found, None
    return _ladder_search(ladder, lambda i: _fit_raster(search, codec, ladder[i], levels, max_bytes))


def _fit_raster(search: _Search, codec: str, raster: tuple[int, int], levels: int, max_bytes: int,
                prior: dict[int, int] | None = None):
    """((psnr, settings) at the best quality that fits on this raster, or None; size at quality 1)."""
    rw, rh = raster

    def size(q: int) -> int:
        return search.size(PixelSettings(codec, rw, rh, quality=q, levels=levels))

    low = size(1)
    if low > max_bytes:
        return None, low
    q, _ = _fit_quality(size, max_bytes, prior or {})
    s = PixelSettings(codec, rw, rh, quality=q, levels=levels)
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


def _fast(search: _Search, c: ThumbnailCodec, ladder: list[tuple[int, int]], levels: int, max_bytes: int):
    """Rate control with few real encodes; None when no raster fits (the exhaustive search then says
    what the smallest size is).

    The codec's proxy encoder (much quicker) predicts, on every raster, the quality that fits within a
    step or two, and its PSNR there; it scores large rasters low (it lacks the slow tools) but not small
    ones, so the real peak lies at or above the proxy's. Real encodes then start just below the proxy's
    peak, fit the quality from the predicted one and climb while the real PSNR rises.
    """
    proxies = search.proxies.setdefault(c.name, {})  # raster -> quality -> (payload, size), shared by searches
    predicted: dict[int, int] = {}

    def evaluate(i: int):
        raster = ladder[i]
        seen = proxies.setdefault(raster, {})
        target = None

        def size(q: int) -> int:
            nonlocal target
            if q not in seen:
                target = to_uint8(search.targets().get(*raster)) if target is None else target
                seen[q] = c.proxy_thumbnail(target, q)
            return seen[q][1]

        low = size(1)
        if low > max_bytes:
            return None, low
        # the nearest smaller raster already tried predicts this one's curve (fewer probes)
        below = next((proxies[r] for r in reversed(ladder[:i]) if len(proxies.get(r, ())) > 1), {})
        q, _ = _fit_quality(size, max_bytes, {k: n for k, (_, n) in below.items()})
        predicted[i] = q
        recon = c.decode_thumbnail(seen[q][0], *raster, q)
        score = psnr(np.asarray(Image.fromarray(recon).resize(search.score_size, UP_FILTER)), search.reference)
        return (score, raster), low

    found, _ = _ladder_search(ladder, evaluate)
    if found is None:
        return None
    peak = ladder.index(found[1])
    real: dict[int, tuple[float, PixelSettings] | None] = {}

    def fit(i: int):
        if i not in real:
            real[i] = None
            if 0 <= i < len(ladder) and (i in predicted or evaluate(i)[0] is not None):
                # ranking takes the predicted quality when it fits (one encode); the winner is then
                # pushed up to the largest quality that fits
                real[i] = _fit_near(search, c.name, ladder[i], levels, max_bytes, predicted[i], upward=False)
        return real[i]

    best_i = peak if fit(peak) is not None else None
    if best_i is None:
        return None
    for step in (1, -1):  # the climb goes up first: the proxy undervalues the larger rasters
        moved = False
        while True:  # quality steps make the curve bumpy: look two rasters ahead before stopping
            ahead = [j for j in (best_i + step, best_i + 2 * step) if (r := fit(j)) is not None
                     and r[0] > real[best_i][0]]
            if not ahead:
                break
            best_i, moved = ahead[0], True
        if moved:
            break
    return _fit_near(search, c.name, ladder[best_i], levels, max_bytes, real[best_i][1].quality)


def _fit_near(search: _Search, codec: str, raster: tuple[int, int], levels: int, max_bytes: int, guess: int,
              upward: bool = True):
    """(psnr, settings) at the largest quality that fits on this raster, searched from ``guess`` (a good
    guess costs two encodes); None when quality 1 does not fit. Without ``upward``, a guess that fits
    is taken as it is."""
    def at(q: int) -> PixelSettings:
        return PixelSettings(codec, *raster, quality=q, levels=levels)

    def fits(q: int) -> bool:
        return search.size(at(q)) <= max_bytes

    q = min(100, max(1, guess))
    if fits(q) and not upward:
        return search.score(at(q)), at(q)
    if fits(q):  # gallop up to a quality that does not fit, then bisect
        lo, step = q, 1
        while lo + step <= 100 and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(101, lo + step)
    else:
        hi, step = q, 1
        while hi - step >= 1 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = hi - step
        if lo < 1:
            if not fits(1):
                return None
            lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    q = lo
    return search.score(at(q)), at(q)


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


PREVIEW_SHARE = 0.04  # the last preview level's share of the pixel budget; each earlier one has half


def preview_budgets(levels: int, max_bytes: int) -> list[int]:
    """Bytes for each level before the last: small, so that the last level is nearly a single level's."""
    return [int(max_bytes * PREVIEW_SHARE / 2 ** (levels - 2 - k)) for k in range(levels - 1)]


def _best_levels(search: _Search, codec: str, levels: int, max_bytes: int, exhaustive: bool):
    """Like _best_under_budget, for any number of levels. Thumbnail codecs send small previews first,
    each a picture of its own (see miscnet.core.pixel.thumbnail); the last level gets what is left."""
    c = lookup(codec)
    if levels == 1 or not c.quality_search:
        return _best_under_budget(search, codec, levels, max_bytes, exhaustive)
    previews: list[PixelSettings] = []
    for budget in preview_budgets(levels, max_bytes):
        found, low = _best_under_budget(search, codec, 1, budget, exhaustive)
        if found is None:  # too small a share: the smallest preview there is, if it leaves room
            found, _ = _best_under_budget(search, codec, 1, low or 0, exhaustive) if low else (None, None)
            if found is None:
                return None, low
        previews.append(found[1])
    used = sum(search.size(p) for p in previews)
    final, low = _best_under_budget(search, codec, 1, max_bytes - used, exhaustive)
    if final is None:
        return None, None if low is None else low + used
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
