"""The semantic layer's data: what the LMM says about an image, and the readers for it.

MISC's LMM encoder answers with the names of the most striking objects (at most 3 words each), one
detail sentence per object (at most 10 words) and an overall caption of about 50 words. This module
holds that answer as immutable data, reads it from a JSON sidecar or from MISC's own CSV layout, and
checks it against the configured limits. Every malformed input raises SemanticsError with a one-line
message that names the file; nothing from json / csv internals escapes.

JSON sidecar::

    {"objects": [{"name": "Red Box", "detail": "A flat red rectangle.", "box": [x0, y0, x1, y1]}],
     "caption": "..."}

``box`` is optional: normalised to [0, 1], origin top-left, x0 < x1, y0 < y1.

MISC CSV (see /work/shared/misc-example): columns ``name,prompt``; ``prompt`` is the names line
(comma-separated, ending in a period), one detail line per object, a blank line, then the caption.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miscnet.core.errors import SemanticsError

MAX_FILE_BYTES = 1 << 20  # sidecars are a few hundred bytes; anything near a MiB is not one
MAX_OBJECTS_HARD = 64  # the codec refuses more (a bound on what a corrupt layer can claim)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SemanticObject:
    """One named object: its name (MISC: at most 3 words), one detail sentence, an optional box."""

    name: str
    detail: str
    box: Box | None = None  # x0, y0, x1, y1 normalised to [0, 1], origin top-left

    def __post_init__(self) -> None:
        # Checked here too, not only in the readers: other layers build objects directly.
        _text(self.name, "object name", "")
        _text(self.detail, "object detail", "")
        if self.box is not None:
            object.__setattr__(self, "box", _box(self.box, "object box", ""))


@dataclass(frozen=True)
class Semantics:
    """The LMM's answer for one image: objects in order of importance, and the overall caption."""

    objects: tuple[SemanticObject, ...]
    caption: str

    def __post_init__(self) -> None:
        # A list passed by a caller would make the frozen value unhashable and mutable underneath.
        if not isinstance(self.objects, tuple):
            object.__setattr__(self, "objects", tuple(self.objects))
        for o in self.objects:
            if not isinstance(o, SemanticObject):
                raise SemanticsError(f"objects must be SemanticObject, not {type(o).__name__}")
        _text(self.caption, "caption", "")

    def text_chars(self) -> int:
        """Characters of text the semantic layer carries: every name, every detail and the caption.

        Counted in Unicode code points of the strings as stored (readers strip surrounding
        whitespace), with nothing added for separators. MISC counts 8 bits per character of the
        text it sends, so this times 8 is MISC's bit cost. Note MISC's own figure for its published
        example (638) counts the detail lines with their trailing spaces and the caption, but not
        the names (it does not send them); we send the names, so we count them.
        """
        return sum(len(o.name) + len(o.detail) for o in self.objects) + len(self.caption)

    def texts(self) -> list[str]:
        """All text fields in coding order: names, then details, then the caption."""
        return [o.name for o in self.objects] + [o.detail for o in self.objects] + [self.caption]


@dataclass(frozen=True)
class SemanticLimits:
    """MISC's prompt limits. Breaking a soft limit is a warning (an error when ``strict``)."""

    max_objects: int = 3
    max_name_words: int = 3
    max_detail_words: int = 10
    caption_words: int = 50  # the target ("about 50 words"); informational
    caption_max_words: int = 120
    strict: bool = False
    max_text_bytes: int = 8192  # UTF-8 bytes of all text together; always a hard limit


def _clip(text: str, n: int = 40) -> str:
    """A short single-line rendering of user text for messages."""
    r = repr(text)
    return r if len(r) <= n else r[: n - 4] + "...'"


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def check_limits(sem: Semantics, limits: SemanticLimits = SemanticLimits(), *,
                 source: str | None = None) -> list[str]:
    """Warnings for soft-limit breaks; SemanticsError for hard ones (and for soft ones when strict).

    Hard, always: an empty name, text that is not valid Unicode, more than MAX_OBJECTS_HARD objects,
    more than ``max_text_bytes`` of UTF-8. Soft: more than ``max_objects`` objects, too many words in
    a name / detail / caption, an empty detail or caption, a repeated name.
    """
    at = _where(source)
    hard: list[str] = []
    soft: list[str] = []
    if len(sem.objects) > MAX_OBJECTS_HARD:
        hard.append(f"{len(sem.objects)} objects (at most {MAX_OBJECTS_HARD} can be coded)")
    total = 0
    for field in sem.texts():
        try:
            total += len(field.encode("utf-8"))
        except UnicodeEncodeError:
            hard.append(f"text {_clip(field)} is not valid Unicode (lone surrogate)")
    if total > limits.max_text_bytes:
        hard.append(f"text is {total} bytes of UTF-8, over the limit of {limits.max_text_bytes}")
    if len(sem.objects) > limits.max_objects:
        soft.append(f"{len(sem.objects)} objects, MISC uses at most {limits.max_objects}")
    seen: set[str] = set()
    for i, obj in enumerate(sem.objects, 1):
        if not obj.name.strip():
            hard.append(f"object {i} has an empty name")
        n = len(obj.name.split())
        if n > limits.max_name_words:
            soft.append(f"object {i} name {_clip(obj.name)} has {n} words (limit {limits.max_name_words})")
        key = obj.name.strip().lower()
        if key and key in seen:
            soft.append(f"object {i} name {_clip(obj.name)} repeats an earlier name")
        seen.add(key)
        n = len(obj.detail.split())
        if n == 0:
            soft.append(f"object {i} has an empty detail")
        elif n > limits.max_detail_words:
            soft.append(f"object {i} detail has {n} words (limit {limits.max_detail_words})")
    n = len(sem.caption.split())
    if n == 0:
        soft.append("the caption is empty")
    elif n > limits.caption_max_words:
        soft.append(f"the caption has {n} words (target about {limits.caption_words}, "
                    f"limit {limits.caption_max_words})")
    if hard:
        raise SemanticsError(at + "; ".join(hard))
    if limits.strict and soft:
        raise SemanticsError(at + "; ".join(soft) + " (strict limits)")
    return [at + w for w in soft]


# --------------------------------------------------------------------------- JSON


def semantics_to_json(sem: Semantics) -> dict[str, Any]:
    """The JSON sidecar form (box only where known)."""
    objs = []
    for o in sem.objects:
        d: dict[str, Any] = {"name": o.name, "detail": o.detail}
        if o.box is not None:
            d["box"] = list(o.box)
        objs.append(d)
    return {"objects": objs, "caption": sem.caption}


def _text(value: Any, what: str, at: str) -> str:
    if not isinstance(value, str):
        raise SemanticsError(f"{at}{what} must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SemanticsError(f"{at}{what} is not valid Unicode (lone surrogate)") from None
    return value


def _box(value: Any, what: str, at: str) -> Box | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise SemanticsError(f"{at}{what} must be a list of 4 numbers [x0, y0, x1, y1]")
    nums = []
    for v in value:
        # bool is an int subclass; true/false in a box is a mistake, not 1/0
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SemanticsError(f"{at}{what} must hold numbers, found {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f) or not 0.0 <= f <= 1.0:
            raise SemanticsError(f"{at}{what} values must be finite and within [0, 1], found {v!r}")
        nums.append(f)
    x0, y0, x1, y1 = nums
    if not (x0 < x1 and y0 < y1):
        raise SemanticsError(f"{at}{what} needs x0 < x1 and y0 < y1, found {nums}")
    return (x0, y0, x1, y1)


_OBJECT_KEYS = ("name", "detail", "box")
_TOP_KEYS = ("objects", "caption")


def semantics_from_dict(d: Any, source: str) -> Semantics:
    """Build Semantics from the parsed JSON sidecar ``d``; ``source`` names it in errors."""
    at = _where(source)
    if not isinstance(d, dict):
        raise SemanticsError(f"{at}the top level must be an object with 'objects' and 'caption'")
    for key in d:
        if key not in _TOP_KEYS:
            raise SemanticsError(f"{at}unknown key {_clip(str(key))} (expected objects, caption)")
    for key in _TOP_KEYS:
        if key not in d:
            raise SemanticsError(f"{at}missing key '{key}'")
    raw = d["objects"]
    if not isinstance(raw, list):
        raise SemanticsError(f"{at}'objects' must be a list, not {type(raw).__name__}")
    if len(raw) > MAX_OBJECTS_HARD:
        raise SemanticsError(f"{at}{len(raw)} objects (at most {MAX_OBJECTS_HARD} can be coded)")
    objects = []
    for i, o in enumerate(raw, 1):
        if not isinstance(o, dict):
            raise SemanticsError(f"{at}object {i} must be an object with name, detail, box")
        for key in o:
            if key not in _OBJECT_KEYS:
                raise SemanticsError(
                    f"{at}unknown key {_clip(str(key))} in object {i} (expected name, detail, box)")
        for key in ("name", "detail"):
            if key not in o:
                raise SemanticsError(f"{at}object {i} is missing '{key}'")
        objects.append(SemanticObject(
            name=_text(o["name"], f"object {i} name", at),
            detail=_text(o["detail"], f"object {i} detail", at),
            box=_box(o.get("box"), f"object {i} box", at),
        ))
    caption = _text(d["caption"], "caption", at)
    return Semantics(objects=tuple(objects), caption=caption)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)  # json keeps the last silently; a repeated key is a mistake
        d[k] = v
    return d


def _parse_json(text: str, source: str) -> Semantics:
    try:
        d = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise SemanticsError(f"{source}: key {_clip(str(e.args[0]))} appears twice") from None
    except json.JSONDecodeError as e:
        raise SemanticsError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (RecursionError, ValueError) as e:  # absurd nesting; huge integer literals
        raise SemanticsError(f"{source}: invalid JSON ({type(e).__name__})") from None
    return semantics_from_dict(d, source)


# --------------------------------------------------------------------------- MISC CSV


def parse_misc_prompt(prompt: str, source: str) -> Semantics:
    """Parse one MISC ``prompt`` cell: names line, one detail line per name, blank line, caption."""
    at = _where(source)
    lines = [ln.rstrip() for ln in prompt.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise SemanticsError(f"{at}the prompt is empty")
    names_line = lines[0].strip()
    if names_line.endswith("."):
        names_line = names_line[:-1]
    names = [n.strip() for n in names_line.split(",")]
    if any(not n for n in names):
        raise SemanticsError(f"{at}empty object name in names line {_clip(lines[0])}")
    details = []
    i = 1
    while i < len(lines) and lines[i].strip():
        details.append(lines[i].strip())
        i += 1
    if len(details) != len(names):
        raise SemanticsError(
            f"{at}{len(names)} object names but {len(details)} detail lines (one per object, "
            "then a blank line before the caption)")
    if len(names) > MAX_OBJECTS_HARD:
        raise SemanticsError(f"{at}{len(names)} objects (at most {MAX_OBJECTS_HARD} can be coded)")
    caption = "\n".join(lines[i:]).strip()
    return Semantics(
        objects=tuple(SemanticObject(name=n, detail=d) for n, d in zip(names, details, strict=True)),
        caption=caption,
    )


def _parse_csv(text: str, source: str, image_name: str | None) -> Semantics:
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        raise SemanticsError(f"{source}: malformed CSV: {e}") from None
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["name", "prompt"]:
        raise SemanticsError(f"{source}: the first row must be the header 'name,prompt'")
    if any(c.strip() for c in rows[0][2:]):
        raise SemanticsError(f"{source}: unexpected extra header columns {rows[0][2:]}")
    entries: list[tuple[int, str, str]] = []
    for lineno, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue  # MISC's file ends in a run of ',' rows
        if len(row) < 2 or any(c.strip() for c in row[2:]):
            raise SemanticsError(f"{source}: row {lineno} must have exactly 2 columns (name, prompt)")
        entries.append((lineno, row[0].strip(), row[1]))
    if not entries:
        raise SemanticsError(f"{source}: no data rows")
    if image_name is None:
        if len(entries) != 1:
            raise SemanticsError(
                f"{source}: {len(entries)} rows; name the image to choose one")
        lineno, _, prompt = entries[0]
    else:
        want = os.path.basename(image_name)
        hits = [e for e in entries if os.path.basename(e[1]) == want]
        if not hits:
            names = ", ".join(_clip(e[1], 30) for e in entries[:5])
            more = " ..." if len(entries) > 5 else ""
            raise SemanticsError(f"{source}: no row for image {_clip(want)} (rows: {names}{more})")
        if len(hits) > 1:
            raise SemanticsError(f"{source}: {len(hits)} rows for image {_clip(want)}")
        lineno, _, prompt = hits[0]
    sem = parse_misc_prompt(prompt, f"{source} row {lineno}")
    for field in sem.texts():
        _text(field, "text", _where(source))
    return sem


# --------------------------------------------------------------------------- entry point


def load_semantics(path: str | os.PathLike[str], image_name: str | None = None,
                   limits: SemanticLimits = SemanticLimits()) -> tuple[Semantics, list[str]]:
    """Read a .json sidecar or a MISC .csv; return the semantics and the limit warnings.

    For a CSV, ``image_name`` (its basename) picks the row; with no name the CSV must have exactly
    one data row.
    """
    p = Path(path)
    source = str(path)
    ext = p.suffix.lower()
    if ext not in (".json", ".csv"):
        raise SemanticsError(f"{source}: unknown semantics format {ext or '(no extension)'!r}; "
                             "expected .json or .csv")
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise SemanticsError(f"{source}: not a regular file")
        if size > MAX_FILE_BYTES:
            raise SemanticsError(f"{source}: {size} bytes, refusing semantics files over 1 MiB")
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SemanticsError(f"{source}: no such file") from None
    except OSError as e:
        raise SemanticsError(f"{source}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_FILE_BYTES:  # grew while we looked
        raise SemanticsError(f"{source}: refusing semantics files over 1 MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SemanticsError(f"{source}: not UTF-8 (bad byte at offset {e.start})") from None
    if ext == ".json":
        sem = _parse_json(text, source)
    else:
        sem = _parse_csv(text, source, image_name)
    warnings = check_limits(sem, limits, source=source)
    return sem, warnings
