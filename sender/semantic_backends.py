"""Semantic encoders: where an image's Semantics come from.

* ``sidecar`` (the default): a JSON sidecar or MISC CSV written beforehand (miscnet.core.semantics).
* ``openai``: any OpenAI-compatible chat-completions endpoint that takes images (GPT-4o, a local vLLM
  or Ollama server). Stdlib HTTP only; endpoint, model and key come from options or the environment
  (``OPENAI_BASE_URL``, ``MISCNET_LMM_MODEL``, ``OPENAI_API_KEY``); timeouts and retries with back-off.
* ``hf``: a local transformers vision-language chat model (``AutoModelForImageTextToText`` with its
  processor's chat template: Qwen2-VL, Qwen2.5-VL, LLaVA, SmolVLM, Gemma 3, ...), from a folder or a
  cached id (``--vlm-model`` / ``MISCNET_VLM_MODEL``).

Both model backends ask ``question()`` — written for this project, asking for MISC's three lists (object
names, one detail sentence each, an overall caption) plus a box per object where the model can give one
— and read the reply with ``parse_answer``, which accepts what real models write: the JSON asked for
(bare, fenced or inside prose, with common key spellings), MISC's own line layout, labelled sections
(``Objects:`` / ``Details:`` / ``Caption:``) and numbered lists (``1. Cat: a grey cat.``). An answer it
cannot read is a one-line SemanticsError quoting the start of the answer.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from miscnet.core.errors import MiscError, SemanticsError
from miscnet.core.semantics import (
    MAX_OBJECTS_HARD,
    SemanticLimits,
    SemanticObject,
    Semantics,
    check_limits,
    load_semantics,
    parse_misc_prompt,
)

BACKENDS = ("sidecar", "openai", "hf")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"  # the OpenAI client's own default endpoint
BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
LMM_MODEL_ENV = "MISCNET_LMM_MODEL"
MAX_RESPONSE_BYTES = 4 << 20
RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
BOX_SCALES = ("auto", "unit", "permille", "pixel")
DEFAULT_LIMITS = SemanticLimits()


# ============================================================================ the question


def question(limits: SemanticLimits = DEFAULT_LIMITS, boxes: bool = True) -> str:
    """The prompt both model backends send with the image (MISC's three lists, boxes optional)."""
    box_line = (
        '\n  - "box": where the object is, as [x0, y0, x1, y1] in fractions of the image width and height '
        "(0 to 1, origin at the top-left corner); leave it out if you cannot tell."
        if boxes else "")
    box_field = ', "box": [x0, y0, x1, y1]' if boxes else ""
    return (
        "You are the encoder of an image compression system. A painter who cannot see this image will "
        "redraw it from your words alone, so be concrete and visual, and describe only what is visible.\n"
        "\n"
        "Answer with a single JSON object and nothing else:\n"
        f'{{"objects": [{{"name": "...", "detail": "..."{box_field}}}], "caption": "..."}}\n'
        "\n"
        f'- "objects": the {limits.max_objects} most striking objects, the most important first.\n'
        f'  - "name": at most {limits.max_name_words} words.\n'
        f'  - "detail": one sentence of at most {limits.max_detail_words} words on how that object looks '
        "(colour, material, texture, shape, pose)."
        f"{box_line}\n"
        f'- "caption": about {limits.caption_words} words on the whole image: composition and layout, '
        "attributes inside the objects, how the objects relate to each other, lighting, colours and style."
    )


# ============================================================================ the parser


@dataclass(frozen=True)
class _Raw:
    names: list[str]
    details: list[str]
    boxes: list[Any]  # per object: a 4-number list or None
    caption: str


_NAME_KEYS = ("name", "object", "label", "title", "category", "noun")
_DETAIL_KEYS = ("detail", "details", "description", "desc", "sentence", "attributes", "appearance")
_BOX_KEYS = ("box", "bbox", "bbox_2d", "bounding_box", "boundingbox", "location", "box_2d")
_CAPTION_KEYS = ("caption", "overall", "overall_description", "overall description", "global_description",
                 "description", "summary", "scene", "scene_description", "image_description")
_LIST_NAME_KEYS = ("names", "object_names", "objects")
_LIST_DETAIL_KEYS = ("details", "object_details", "descriptions", "detail_sentences")
_LIST_BOX_KEYS = ("boxes", "bboxes", "bounding_boxes", "locations")

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BOX4 = re.compile(rf"[\[(]\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\])]")
_BOX_PAIRS = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*(?:to\s*)?\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_QWEN_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_QWEN_TAGS = re.compile(r"<\|(?:object_ref_start|object_ref_end|im_end|im_start|endoftext)\|>")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_ITEM = re.compile(r"^\s*(?:[-*\u2022+]|\(?\d{1,2}[.):]|\(?[a-zA-Z][.)])\s+(.*)$")
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*|__)?\s*(?P<label>[A-Za-z][A-Za-z ()/_-]{1,40}?)\s*(?:\*\*|__)?\s*[:\uff1a]\s*"
    r"(?:\*\*|__)?\s*(?P<rest>.*)$")
_SECTION_WORDS = {
    "names": ("objects", "object names", "names", "object list", "main objects", "key objects", "most striking objects",
              "three most striking objects", "the most striking objects", "striking objects", "list of objects",
              "object", "name"),
    "details": ("details", "object details", "detail sentences", "details of objects", "descriptions",
                "object descriptions", "detail", "detailed descriptions", "detail descriptions"),
    "boxes": ("boxes", "bounding boxes", "bboxes", "locations", "box", "positions"),
    "caption": ("caption", "overall description", "overall", "description", "summary", "scene description",
                "global description", "overall caption", "image description", "general description",
                "scene", "description of the image", "whole image"),
}


def _clip_text(text: str, n: int = 80) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= n else flat[: n - 3] + "...")


def _fail(reason: str, text: str, source: str) -> SemanticsError:
    return SemanticsError(f"{source}: could not read MISC's three lists (names, details, caption): {reason}; "
                          f"the answer began {_clip_text(text)}")


def _clean_name(name: str) -> str:
    name = re.sub(r"[*_`#]+", "", name).strip()
    name = name.strip(" \t\"'\u201c\u201d\u2018\u2019")
    name = re.sub(r"^(?:\d{1,2}[.):]|[-\u2022])\s*", "", name)
    return name.rstrip(".;:,").strip()


def _clean_sentence(text: str) -> str:
    text = re.sub(r"\*\*|__|`", "", text).strip()
    return text.strip(" \t\"\u201c\u201d").strip()


def _strip_fences(text: str) -> str:
    text = _THINK.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _json_candidates(text: str) -> list[Any]:
    """Every JSON object or list found in text: fenced blocks first, then any balanced {...} / [...]."""
    found: list[Any] = []
    for m in re.finditer(r"```(?:json|JSON)?\s*\n?(.*?)```", text, re.S):
        try:
            found.append(json.loads(m.group(1)))
        except (json.JSONDecodeError, RecursionError, ValueError):
            pass
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except (json.JSONDecodeError, RecursionError, ValueError):
                i += 1
                continue
            if isinstance(value, (dict, list)):
                found.append(value)
            i = end
        else:
            i += 1
    return found


def _pick(d: dict, keys: tuple[str, ...]) -> Any:
    low = {str(k).strip().lower().replace("-", "_"): v for k, v in d.items()}
    for k in keys:
        k2 = k.replace(" ", "_")
        if k2 in low:
            return low[k2]
        if k in low:
            return low[k]
    return None


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return None


def _from_json(value: Any) -> _Raw | None:
    """Read the JSON shapes models produce; None when this value is not one of them."""
    if isinstance(value, list):  # a bare list of objects, no caption
        value = {"objects": value}
    if not isinstance(value, dict):
        return None
    caption = _as_text(_pick(value, _CAPTION_KEYS))
    objects = _pick(value, ("objects", "items", "entities", "main_objects", "striking_objects"))
    names: list[str] = []
    details: list[str] = []
    boxes: list[Any] = []
    if isinstance(objects, list) and objects and all(isinstance(o, dict) for o in objects):
        for o in objects:
            name = _as_text(_pick(o, _NAME_KEYS))
            detail = _as_text(_pick(o, _DETAIL_KEYS))
            if name is None:
                return None
            names.append(name)
            details.append(detail if detail is not None else "")
            boxes.append(_pick(o, _BOX_KEYS))
    elif isinstance(objects, dict) and objects:  # {"cat": "a grey cat", ...}
        for k, v in objects.items():
            names.append(str(k))
            if isinstance(v, dict):
                details.append(_as_text(_pick(v, _DETAIL_KEYS)) or "")
                boxes.append(_pick(v, _BOX_KEYS))
            else:
                details.append(_as_text(v) or "")
                boxes.append(None)
    else:  # three parallel lists
        raw_names = _pick(value, _LIST_NAME_KEYS)
        raw_details = _pick(value, _LIST_DETAIL_KEYS)
        raw_boxes = _pick(value, _LIST_BOX_KEYS)
        if isinstance(raw_names, str):
            raw_names = [n for n in re.split(r"[,;]", raw_names.rstrip(".")) if n.strip()]
        if not isinstance(raw_names, list) or not all(isinstance(n, str) for n in raw_names):
            return None if caption is None else _Raw([], [], [], caption)
        names = list(raw_names)
        if isinstance(raw_details, list) and all(isinstance(d, str) for d in raw_details):
            details = list(raw_details)
        elif raw_details is None:
            details = []
        else:
            return None
        boxes = list(raw_boxes) if isinstance(raw_boxes, list) else []
        boxes += [None] * max(0, len(names) - len(boxes))
    if caption is None:
        return None
    return _Raw(names, details, boxes[: len(names)], caption)


def _section_of(label: str) -> str | None:
    label = re.sub(r"\s+", " ", label.strip().lower().replace("_", " "))
    label = re.sub(r"^(?:the |an |a )", "", label)
    label = re.sub(r"\s*\(.*\)$", "", label)
    for section, words in _SECTION_WORDS.items():
        if label in words:
            return section
    return None


def _split_names(text: str) -> list[str]:
    text = text.strip().rstrip(".")
    parts = re.split(r"\s*[,;]\s*|\s+and\s+(?=[^,]*$)", text)
    return [_clean_name(p) for p in parts if _clean_name(p)]


def _name_detail(item: str) -> tuple[str | None, str]:
    """'Cat: a grey cat' / '**Cat** - a grey cat' -> (name, detail); a plain sentence -> (None, it)."""
    m = re.match(r"^\s*(?:\*\*|__)(.+?)(?:\*\*|__)\s*[:\-\u2013\u2014]?\s*(.*)$", item)
    if m and len(m.group(1).split()) <= 6:
        return _clean_name(m.group(1)), _clean_sentence(m.group(2))
    m = re.match(r"^\s*([^:\u2013\u2014]{1,60}?)\s*(?::|\s[-\u2013\u2014]\s)\s*(.+)$", item)
    if m and len(m.group(1).split()) <= 6:
        return _clean_name(m.group(1)), _clean_sentence(m.group(2))
    return None, _clean_sentence(item)


def _take_box(text: str) -> tuple[str, Any]:
    """Remove one box written inside text ([x0, y0, x1, y1] or (x0, y0), (x1, y1)); return (text, box)."""
    m = _QWEN_BOX.search(text)
    if m:
        nums = re.findall(_NUM, m.group(1))
        return (text[: m.start()] + text[m.end():]).strip(), _Permille(float(x) for x in nums)
    for pat in (_BOX4, _BOX_PAIRS):
        m = pat.search(text)
        if m:
            rest = (text[: m.start()] + text[m.end():]).strip()
            rest = re.sub(r"\s*(?:box|bbox|bounding box)\s*[:=]?\s*$", "", rest, flags=re.I).strip(" ,;:-")
            return rest, [float(x) for x in m.groups()]
    return text, None


def _from_sections(text: str) -> _Raw | None:
    """Labelled sections (Objects: / Details: / Boxes: / Caption:) with inline or itemised content."""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.split("\n"):
        m = _LABEL.match(line)
        section = _section_of(m.group("label")) if m else None
        if section is not None and section not in sections:
            current = section
            sections[current] = [m.group("rest")] if m.group("rest").strip() else []
            continue
        if current is not None:
            sections[current].append(line)
    if "caption" not in sections or not ({"names", "details"} & sections.keys()):
        return None
    names: list[str] = []
    details: list[str] = []
    boxes: list[Any] = []
    name_lines = [ln for ln in sections.get("names", []) if ln.strip()]
    detail_lines = [ln for ln in sections.get("details", []) if ln.strip()]
    items = [_ITEM.match(ln) for ln in name_lines]
    if name_lines and all(items) and len(name_lines) > 1:  # one object per line, maybe with its detail
        for it in items:
            body, box = _take_box(it.group(1))
            name, detail = _name_detail(body)
            names.append(name if name is not None else _clean_name(body))
            if name is not None and detail:
                details.append(detail)
            boxes.append(box)
    elif name_lines:
        joined = " ".join(ln.strip() for ln in name_lines)
        if _ITEM.match(joined):
            joined = _ITEM.match(joined).group(1)
        names = _split_names(joined)
        boxes = [None] * len(names)
    if detail_lines:
        details = []
        derived: list[str] = []
        for ln in detail_lines:
            it = _ITEM.match(ln)
            body = it.group(1) if it else ln.strip()
            body, box = _take_box(body)
            name, detail = _name_detail(body)
            details.append(detail)
            derived.append(name or "")
            if box is not None:
                k = len(details) - 1
                if k < len(boxes):
                    boxes[k] = box
                elif not names:
                    boxes.append(box)
        if not names:
            if not all(derived):
                return None
            names = derived
            boxes += [None] * (len(names) - len(boxes))
    for ln in sections.get("boxes", []):
        if not ln.strip():
            continue
        it = _ITEM.match(ln)
        body = it.group(1) if it else ln
        _, box = _take_box(body)
        if box is None:
            continue
        label, _ = _name_detail(body)
        slot = None
        if label:
            low = [n.lower() for n in names]
            if label.lower() in low:
                slot = low.index(label.lower())
        if slot is None:
            slot = next((k for k, b in enumerate(boxes) if b is None), None)
        if slot is not None and slot < len(names):
            boxes[slot] = box
    caption = " ".join(ln.strip() for ln in sections["caption"] if ln.strip())
    boxes += [None] * (len(names) - len(boxes))
    return _Raw(names, details, boxes[: len(names)], _clean_sentence(caption))


def _from_numbered(text: str) -> _Raw | None:
    """A numbered / bulleted list of 'Name: detail' items plus a caption paragraph."""
    names: list[str] = []
    details: list[str] = []
    boxes: list[Any] = []
    rest: list[str] = []
    for line in text.split("\n"):
        it = _ITEM.match(line)
        if it:
            body, box = _take_box(it.group(1))
            name, detail = _name_detail(body)
            if name is None or not detail:
                return None
            names.append(name)
            details.append(detail)
            boxes.append(box)
        elif line.strip():
            rest.append(line.strip())
    if not names or not rest:
        return None
    # prose before the list is usually a preamble ("Here is ..."); the caption is the longest paragraph
    caption = max(rest, key=len)
    return _Raw(names, details, boxes, _clean_sentence(caption))


def _from_misc_layout(text: str, source: str) -> _Raw | None:
    """MISC's own layout: names line, one detail line per object, blank line, caption."""
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    cleaned: list[str] = []
    line_boxes: list[Any] = []
    for ln in lines:
        it = _ITEM.match(ln)
        body, box = _take_box(it.group(1) if it else ln)
        cleaned.append(body)
        line_boxes.append(box)
    try:
        sem = parse_misc_prompt("\n".join(cleaned), source)
    except SemanticsError:
        return None
    details = []
    for o in sem.objects:  # "Cat: a grey cat" on a detail line repeats the name; keep the sentence
        name, detail = _name_detail(o.detail)
        details.append(detail if name and name.lower() == o.name.lower() else o.detail)
    boxes = line_boxes[1:1 + len(sem.objects)]
    return _Raw([o.name for o in sem.objects], details, boxes, sem.caption)


class _Permille(list):
    """A box written in Qwen's <|box_start|>(x0,y0),(x1,y1)<|box_end|> form: always on a 0..1000 grid."""


def _box_of(value: Any, image_size: tuple[int, int] | None, scale: str) -> tuple[tuple[float, ...] | None, str]:
    """A normalised (x0, y0, x1, y1) from what a model wrote, or (None, why not)."""
    if value is None:
        return None, ""
    if isinstance(value, dict):
        keys = {k.lower(): v for k, v in value.items()}
        if all(k in keys for k in ("x0", "y0", "x1", "y1")):
            value = [keys["x0"], keys["y0"], keys["x1"], keys["y1"]]
        elif all(k in keys for k in ("xmin", "ymin", "xmax", "ymax")):
            value = [keys["xmin"], keys["ymin"], keys["xmax"], keys["ymax"]]
        else:
            return None, "a box object without x0/y0/x1/y1"
    if isinstance(value, str):
        nums = re.findall(_NUM, value)
        value = [float(n) for n in nums]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(p, (list, tuple)) for p in value):
        value = [*value[0], *value[1]]
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None, "a box that is not 4 numbers"
    try:
        nums = [float(v) for v in value if not isinstance(v, bool)]
    except (TypeError, ValueError):
        return None, "a box with non-numbers"
    if len(nums) != 4 or not all(math.isfinite(v) for v in nums):
        return None, "a box with non-numbers"
    x0, y0, x1, y1 = nums
    top = max(nums)
    if isinstance(value, _Permille):
        scale = "permille"
    if scale == "auto":
        if top <= 1.0:
            scale = "unit"
        elif image_size and x1 <= image_size[0] * 1.02 and y1 <= image_size[1] * 1.02 and x0 >= 0 and y0 >= 0:
            scale = "pixel"
        elif top <= 1000:
            scale = "permille"
        else:
            return None, f"a box {nums} on no known scale"
    if scale == "permille":
        x0, y0, x1, y1 = (v / 1000 for v in nums)
    elif scale == "pixel":
        if not image_size:
            return None, "a box in pixels without the image size"
        w, h = image_size
        x0, y0, x1, y1 = x0 / w, y0 / h, x1 / w, y1 / h
    x0, x1 = sorted((min(max(x0, 0.0), 1.0), min(max(x1, 0.0), 1.0)))
    y0, y1 = sorted((min(max(y0, 0.0), 1.0), min(max(y1, 0.0), 1.0)))
    if not (x1 - x0 > 1e-6 and y1 - y0 > 1e-6):
        return None, f"an empty box {nums}"
    return (x0, y0, x1, y1), ""


def parse_answer(text: str, *, image_size: tuple[int, int] | None = None, box_scale: str = "auto",
                 source: str = "model answer") -> tuple[Semantics, list[str]]:
    """Read an LMM's answer into Semantics; return it with warnings (boxes dropped, no caption, ...).

    ``image_size`` (width, height) is the size of the image the model saw, used for boxes in pixels;
    ``box_scale`` says how boxes are written: ``unit`` (0..1), ``permille`` (0..1000, Qwen2-VL),
    ``pixel``, or ``auto`` (0..1 if every value is, else pixels if they fit the image, else 0..1000).
    """
    if box_scale not in BOX_SCALES:
        raise MiscError(f"unknown box scale {box_scale!r} (use {', '.join(BOX_SCALES)})")
    if not isinstance(text, str) or not text.strip():
        raise SemanticsError(f"{source}: the answer is empty")
    body = _strip_fences(text)
    raw: _Raw | None = None
    for candidate in _json_candidates(body):
        raw = _from_json(candidate)
        if raw is not None:
            break
    if raw is None:
        plain = _QWEN_TAGS.sub("", re.sub(r"```\w*", "", body))
        raw = _from_sections(plain) or _from_numbered(plain) or _from_misc_layout(plain, source)
    if raw is None:
        raise _fail("no JSON object, labelled sections, numbered list or MISC line layout found", text, source)
    names = [_clean_name(n) for n in raw.names]
    details = [_clean_sentence(d) for d in raw.details]
    caption = _clean_sentence(raw.caption)
    warnings: list[str] = []
    if any(not n for n in names):
        raise _fail("an object has an empty name", text, source)
    if details and len(details) != len(names):
        raise _fail(f"{len(names)} object names but {len(details)} detail sentences", text, source)
    if not details:
        details = [""] * len(names)
        if names:
            warnings.append(f"{source}: no detail sentences; the objects' details are empty")
    if not caption:
        raise _fail("no overall caption", text, source)
    if len(names) > MAX_OBJECTS_HARD:
        raise _fail(f"{len(names)} objects (at most {MAX_OBJECTS_HARD} can be coded)", text, source)
    if not names:
        warnings.append(f"{source}: no objects named; only the caption is used")
    objects = []
    for k, (name, detail) in enumerate(zip(names, details, strict=True)):
        box, why = _box_of(raw.boxes[k] if k < len(raw.boxes) else None, image_size, box_scale)
        if why:
            warnings.append(f"{source}: object {k + 1} ({name}): ignored {why}")
        objects.append(SemanticObject(name=name, detail=detail, box=box))
    return Semantics(objects=tuple(objects), caption=caption), warnings


# ============================================================================ images for the models


def _pil(image: np.ndarray, max_side: int):
    from PIL import Image

    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise MiscError("the semantic encoder needs an RGB uint8 image (height, width, 3)")
    im = Image.fromarray(image)
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)
    return im


# ============================================================================ openai


class OpenAIBackend:
    """An OpenAI-compatible /chat/completions endpoint that accepts image_url parts."""

    name = "openai"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, max_tokens: int = 600,
                 max_side: int = 1024, temperature: float = 0.0, limits: SemanticLimits = DEFAULT_LIMITS,
                 boxes: bool = True, box_scale: str = "auto") -> None:
        self.model = model or os.environ.get(LMM_MODEL_ENV) or None
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if not self.model:
            raise MiscError(f"the openai semantic backend needs a model: give --lmm-model NAME or set {LMM_MODEL_ENV} "
                            "(e.g. gpt-4o, or the name your vLLM / Ollama server serves)")
        if not re.match(r"^https?://[^\s/]+", self.base_url):
            raise MiscError(f"LMM endpoint {self.base_url!r} is not an http(s) URL (set --lmm-endpoint or "
                            f"{BASE_URL_ENV}, e.g. http://localhost:8000/v1)")
        if self.api_key is None and self.base_url.startswith("https://api.openai.com"):
            raise MiscError(f"the OpenAI API needs a key: set {API_KEY_ENV} (or point --lmm-endpoint / "
                            f"{BASE_URL_ENV} at a local server that needs none)")
        if timeout <= 0 or retries < 0 or max_tokens <= 0:
            raise MiscError("LMM timeout and max tokens must be positive, retries at least 0")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_tokens, self.max_side, self.temperature = int(max_tokens), int(max_side), float(temperature)
        self.limits, self.boxes, self.box_scale = limits, boxes, box_scale

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def request_body(self, image: np.ndarray) -> tuple[dict, tuple[int, int]]:
        im = _pil(image, self.max_side)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        data_url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question(self.limits, self.boxes)},
                {"type": "image_url", "image_url": {"url": data_url}},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return body, im.size

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "miscnet"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        adapted: set[str] = set()
        attempt = 0
        while attempt <= self.retries:
            wait = self.backoff * (2 ** attempt)
            attempt += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (http(s) checked)
                    raw = resp.read(MAX_RESPONSE_BYTES + 1)
                if len(raw) > MAX_RESPONSE_BYTES:
                    raise MiscError(f"{self.url}: answer over {MAX_RESPONSE_BYTES} bytes")
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    raise MiscError(f"{self.url}: the answer is not JSON (is this an OpenAI-compatible "
                                    f"endpoint?): {_clip_text(raw.decode('utf-8', 'replace'))}") from None
            except urllib.error.HTTPError as e:
                detail = _error_message(e)
                last = f"HTTP {e.code}{': ' + detail if detail else ''}"
                fix = _adapt(body, e.code, detail, adapted)
                if fix:  # newer OpenAI models refuse max_tokens / temperature: resend once, adapted
                    adapted.add(fix)
                    data = json.dumps(body).encode("utf-8")
                    attempt -= 1
                    continue
                if e.code not in RETRY_STATUS:
                    raise MiscError(f"{self.url}: {last}{_status_hint(e.code)}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after:
                    try:
                        wait = max(wait, min(float(retry_after), 60.0))
                    except ValueError:
                        pass
            except urllib.error.URLError as e:
                last = f"cannot connect ({e.reason})"
            except TimeoutError:  # socket.timeout is an alias
                last = f"no answer within {self.timeout:g} s"
            except (http.client.HTTPException, ConnectionError, OSError) as e:
                last = f"connection failed ({type(e).__name__}: {e})"
            if attempt <= self.retries:
                time.sleep(min(wait, 60.0))
        tries = self.retries + 1
        raise MiscError(f"{self.url}: {last} (after {tries} attempt{'s' if tries > 1 else ''}; "
                        "see --lmm-timeout and --lmm-retries)")

    def ask(self, image: np.ndarray) -> tuple[str, tuple[int, int]]:
        """The model's raw answer text and the size of the image it was shown."""
        body, size = self.request_body(image)
        reply = self._post(body)
        try:
            choice = reply["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            err = reply.get("error") if isinstance(reply, dict) else None
            if err:
                msg = err.get("message") if isinstance(err, dict) else err
                raise MiscError(f"{self.url}: {msg}") from None
            raise MiscError(f"{self.url}: the answer has no choices[0].message.content") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            raise MiscError(f"{self.url}: the model {self.model!r} returned no text"
                            f"{f' (finish_reason {reason})' if reason else ''}")
        return content, size

    def describe(self, image: np.ndarray) -> tuple[Semantics, list[str]]:
        text, size = self.ask(image)
        return parse_answer(text, image_size=size, box_scale=self.box_scale, source=f"{self.model} at {self.base_url}")


def _adapt(body: dict, code: int, detail: str, done: set[str]) -> str | None:
    """Change body for a 400 that names a parameter this model does not take; the change's name or None."""
    if code != 400:
        return None
    low = detail.lower()
    if "max_completion_tokens" in low and "max_tokens" in body and "tokens" not in done:
        body["max_completion_tokens"] = body.pop("max_tokens")
        return "tokens"
    if "temperature" in low and "temperature" in body and "temperature" not in done:
        del body["temperature"]
        return "temperature"
    return None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read(65536).decode("utf-8", "replace")
    except Exception:  # the body is optional; the status code is the message
        return ""
    try:
        d = json.loads(raw)
        err = d.get("error", d) if isinstance(d, dict) else d
        msg = err.get("message") if isinstance(err, dict) else err
        return " ".join(str(msg).split())[:200]
    except (json.JSONDecodeError, RecursionError, ValueError):
        return " ".join(raw.split())[:200]


def _status_hint(code: int) -> str:
    if code in (401, 403):
        return f" (check {API_KEY_ENV} / --lmm-api-key)"
    if code == 404:
        return " (check the endpoint: it should end in /v1, and the model name)"
    return ""


# ============================================================================ hf


@functools.lru_cache(maxsize=2)
def _load_vlm(path: str, device: str):
    from miscnet.core.pretrained import load_error, pick_device, quiet_loading, require_torch

    require_torch("the hf semantic backend")
    from pathlib import Path

    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor
    except ImportError:
        raise MiscError("the hf semantic backend needs transformers: pip install 'miscnet[models]'") from None
    dev, dtype = pick_device(device)
    with quiet_loading():
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        except Exception as e:  # transformers raises many types for one "this folder will not load"
            raise load_error("vlm", Path(path), e) from None
    model.to(dev).eval()
    return processor, model, dev


class HFVisionLanguageBackend:
    """A local transformers vision-language chat model."""

    name = "hf"

    def __init__(self, model: str | None = None, *, device: str = "auto", max_new_tokens: int = 400,
                 max_side: int = 1024, limits: SemanticLimits = DEFAULT_LIMITS, boxes: bool = True,
                 box_scale: str | None = None) -> None:
        from miscnet.core.pretrained import require

        self.path = require("vlm", model)
        self.device, self.max_new_tokens, self.max_side = device, int(max_new_tokens), int(max_side)
        self.limits, self.boxes, self.box_scale = limits, boxes, box_scale

    def _loaded(self):
        return _load_vlm(str(self.path), self.device)

    def ask(self, image: np.ndarray) -> tuple[str, tuple[int, int]]:
        from miscnet.core.pretrained import quiet_loading

        processor, model, device = self._loaded()
        im = _pil(image, self.max_side)
        if not getattr(processor, "chat_template", None):
            raise MiscError(f"vlm model {self.path}: its processor has no chat template; the hf backend asks a "
                            "question and needs a chat vision-language model (Qwen2-VL, LLaVA, SmolVLM, ...)")
        messages = [{"role": "user", "content": [{"type": "image", "image": im},
                                                 {"type": "text", "text": question(self.limits, self.boxes)}]}]
        import torch

        with quiet_loading():
            try:  # the processor's own chat path places and expands the image tokens the model's way
                inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt").to(device)
            except Exception as e:  # template or processor mismatch with this model
                raise MiscError(f"vlm model {self.path}: cannot build its input: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}") from None
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        text = processor.batch_decode(new, skip_special_tokens=True)[0]
        return text, im.size

    def describe(self, image: np.ndarray) -> tuple[Semantics, list[str]]:
        text, size = self.ask(image)
        scale = self.box_scale
        if scale is None:  # Qwen2-VL writes boxes on a 0..1000 grid
            scale = "permille" if getattr(self._loaded()[1].config, "model_type", "") == "qwen2_vl" else "auto"
        return parse_answer(text, image_size=size, box_scale=scale, source=f"hf model {self.path.name}")


# ============================================================================ dispatch


class SidecarBackend:
    """Semantics written beforehand: a JSON sidecar or a MISC CSV (row chosen by image_name)."""

    name = "sidecar"

    def __init__(self, path: str | os.PathLike[str], image_name: str | None = None,
                 limits: SemanticLimits = DEFAULT_LIMITS) -> None:
        self.path, self.image_name, self.limits = path, image_name, limits

    def describe(self, image: np.ndarray | None = None) -> tuple[Semantics, list[str]]:
        sem, _ = load_semantics(self.path, image_name=self.image_name, limits=self.limits)
        return sem, []


def semantics_backend(name: str, **options):
    """The backend registered under name: sidecar (path=...), openai or hf (their constructor options)."""
    if name == "sidecar":
        return SidecarBackend(**options)
    if name == "openai":
        return OpenAIBackend(**options)
    if name == "hf":
        return HFVisionLanguageBackend(**options)
    raise MiscError(f"unknown semantics backend {name!r} (available: {', '.join(BACKENDS)})")


def describe_image(backend, image: np.ndarray, limits: SemanticLimits = DEFAULT_LIMITS
                   ) -> tuple[Semantics, list[str]]:
    """Run a backend and check MISC's limits: (semantics, backend warnings + limit warnings)."""
    sem, warnings = backend.describe(image)
    return sem, warnings + check_limits(sem, limits, source=f"{backend.name} semantics")
