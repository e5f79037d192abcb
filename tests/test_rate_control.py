"""Rate control searches what a standard file of the same bytes may use: every raster up to the image's
own size, AVIF's 4:4:4 chroma, libaom's slower speed; previews take what the last level leaves."""

import math
from dataclasses import replace

import numpy as np
import pytest

from miscnet.core.errors import MiscError
from miscnet.core.pixel import PixelSettings, decode_pixels, encode_pixels, lookup, payload_bytes, psnr
from miscnet.core.pixel import avif as avif_codec
from miscnet.core.pixel.imaging import DOWN_FILTER
from miscnet.sender.rate_control import (
    PREVIEW_SHARE,
    choose_settings,
    clear_search_cache,
    codec_ladder,
    preview_budgets,
    raster_ladder,
)


def photo(w: int, h: int, seed: int = 5) -> np.ndarray:
    """Colourful gradients and blocks with mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 9) * np.cos(yy / 13)], axis=-1)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (220, 40, 30)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def stripes(w: int, h: int) -> np.ndarray:
    """Saturated one-pixel colour stripes: chroma that 4:2:0 halves away."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, 0::2] = (255, 0, 0)
    img[:, 1::2] = (0, 0, 255)
    return img


def test_full_size_ladder_reaches_the_image_in_fine_steps():
    lad = raster_ladder(300, 200, full_size=True)
    assert lad[0][1] == 8 and lad[-1] == (300, 200)
    shorts = [min(r) for r in lad]
    assert shorts == sorted(shorts) and len(set(lad)) == len(lad)
    assert all(b / a <= 2 ** (1 / 6) + 0.08 for a, b in zip(shorts, shorts[1:], strict=False))
    assert all(abs(w / h - 1.5) < 0.1 for w, h in lad)
    assert raster_ladder(6000, 5000, full_size=True)[-1] == (4096, 4096)  # clamped to MAX_RASTER
    # the thumbnail codecs search the full-size ladder, the block codec keeps its half-size one
    assert codec_ladder(lookup("avif"), 300, 200)[-1] == (300, 200)
    assert max(min(r) for r in codec_ladder(lookup("block"), 300, 200)) == 100


def test_quick_search_uses_rasters_above_half_size_when_the_budget_allows():
    image = photo(192, 144)
    clear_search_cache()
    s, coded = choose_settings(image, "avif", 1, 6000)
    assert payload_bytes(coded) <= 6000 and s.height > 72  # the old ladder stopped at half the short side
    assert coded == encode_pixels(image, s)


def test_avif_444_round_trips_and_sends_its_header():
    image = stripes(64, 48)
    s420 = PixelSettings("avif", 64, 48, quality=70)
    s444 = replace(s420, chroma="444")
    (lv420,), (lv444,) = encode_pixels(image, s420), encode_pixels(image, s444)
    assert lv444.payload[0] >> 3 == 1  # a sequence header OBU: the receiver cannot predict profile 1
    assert lv420.payload[0] >> 3 != 1  # the predicted header is left out
    # 4:4:4 keeps the stripes' chroma; the receiver decodes the payload as the standard file does
    assert psnr(decode_pixels([lv444], 64, 48), image) > psnr(decode_pixels([lv420], 64, 48), image) + 3
    with pytest.raises(MiscError, match="chroma"):
        encode_pixels(image, PixelSettings("webp", 64, 48, quality=70, chroma="444"))


def test_speed_4_encodes_keep_the_predicted_header():
    # above 96 x 96 the encoder runs libaom at speed 4 with loop restoration as the header prediction
    # says: the payload still starts with the frame, so no header bytes are spent
    image = photo(200, 150)
    (lv,) = encode_pixels(image, PixelSettings("avif", 200, 150, quality=40))
    assert avif_codec.encoder_speed(200, 150) == 4 and avif_codec.avif_speed(200, 150) > 4
    assert lv.payload[0] >> 3 != 1


def test_rate_control_chooses_444_for_chroma_detail_and_never_for_grey():
    clear_search_cache()
    s, _ = choose_settings(stripes(96, 64), "avif", 1, 1500)
    assert s.chroma == "444"
    grey = photo(96, 64).mean(axis=2, keepdims=True).repeat(3, axis=2).astype(np.uint8)
    clear_search_cache()
    s, _ = choose_settings(grey, "avif", 1, 1500)
    assert s.chroma == "420"


def test_canonical_quality_codes_exactly_as_the_quality_does():
    c = lookup("avif")
    thumb = photo(40, 30)
    for q in (5, 37, 63, 99):
        same = c.canonical_quality(q)
        assert same >= q and c.encode_thumbnail(thumb, same) == c.encode_thumbnail(thumb, q)
        if same < 100:
            assert c.encode_thumbnail(thumb, same + 1) != c.encode_thumbnail(thumb, q)


def test_drafts_decode_and_only_where_they_save_time():
    c = lookup("avif")
    assert c.draft_thumbnail(photo(24, 24), 50) is None  # a real encode this small takes a millisecond
    thumb = photo(160, 120)
    draft = c.draft_thumbnail(thumb, 50)
    assert draft is not None and c.decode_thumbnail(draft, 160, 120, 50).shape == (120, 160, 3)
    assert lookup("webp").draft_thumbnail(thumb, 50) is None


@pytest.mark.parametrize("budget", [900, 4000])
def test_previews_take_what_the_last_level_leaves(budget):
    image = photo(256, 192)
    clear_search_cache()
    s, coded = choose_settings(image, "avif", 2, budget)
    preview, last = coded
    share = preview_budgets(2, budget)[0]
    assert payload_bytes(coded) <= budget and 0 < len(preview.payload) <= share
    assert psnr(decode_pixels(coded[:1], 256, 192), image) < psnr(decode_pixels(coded, 256, 192), image)
    assert coded == encode_pixels(image, s)


def test_preview_share_falls_above_a_kilobyte():
    assert preview_budgets(2, 1000) == [int(1000 * PREVIEW_SHARE)]
    assert preview_budgets(2, 4000)[0] == int(PREVIEW_SHARE * math.sqrt(4000 * 1000))  # 80 B, not 160
    assert preview_budgets(3, 4000) == [40, 80]


def test_large_images_score_at_a_smaller_size_without_losing_the_choice():
    from PIL import Image

    small = photo(300, 200)
    big = np.asarray(Image.fromarray(small).resize((1800, 1200), DOWN_FILTER))
    clear_search_cache()
    s, coded = choose_settings(big, "avif", 1, 3000)
    assert payload_bytes(coded) <= 3000 and coded == encode_pixels(big, s)
