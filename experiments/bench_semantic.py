"""Semantic-layer coding benchmark: our payload against MISC's 8 bits per character and brotli.

    python -m miscnet.experiments.bench_semantic [--json] [--target 0.35] [files ...]
    python -m miscnet.experiments.bench_semantic --sets [--json]

Rows: MISC's published LMM answer (GPT-example.csv) and every JSON sidecar in src/miscnet/core/samples/,
or the .json / .csv files given. PASS when every row's ratio (our payload / MISC raw bytes) is at or
below the target. Exit status 1 on FAIL, 2 on unreadable input.

``--sets``: the held-out text sets in experiments/semantic_texts/ (``plain.json``: 20 plain-English image
descriptions; ``mixed.json``: 20 full of names, numbers and foreign words; the coder was tuned on
``tuning.json`` only). Each set's ratio is its payload bytes over its MISC raw bytes, summed over the
set; PASS when every set is at or below its target (SET_TARGETS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from miscnet.core import samples
from miscnet.core import semantic_codec as sc
from miscnet.core.errors import MiscError
from miscnet.core.semantics import Semantics, load_semantics, semantics_from_dict

TARGET = 0.35
SAMPLES = Path(samples.__file__).parent
TEXT_SETS = Path(__file__).resolve().parent / "semantic_texts"
SET_TARGETS = {"plain": 0.22, "mixed": 0.30}  # issue 14; "tuning" is reported, not judged

# MISC's published LMM answer, byte for byte (lcysyzxdxc/MISC at 1099bea7f77df4c13eb1570de2561af0c24e8747,
# GPT-example.csv), so the benchmark and the tests run in any checkout. MISC counts 638 characters
# for it: the detail lines with their trailing spaces and the caption, without the names.
MISC_EXAMPLE_CSV = (
    'name,prompt\r\n'
    'example.png,"Astronaut Helmet, Blue Hair, Orange Paint Splatter.\n'
    'A white astronaut helmet with reflections. \n'
    'Flowing blue hair with lighter blue highlights. \n'
    'Bright orange paint splatter effects surrounding the helmet. \n'
    '\n'
    'The most striking object is the white astronaut helmet that dominates the center, reflecting light '
    'and shades of blue from the surrounding environment. The helmet encases the subject\'s head, '
    'extending down to cover the neck, framing the individual\'s visage. The person\'s blue hair cascades '
    'outwards, gently floating around the face area. The composition emphasizes a sense of creativity '
    'and surrealism, subtly marrying the realism of the helmet with the abstract play of color and form."\r\n'
    + ",\r\n" * 49
)
MISC_EXAMPLE_CHARS = 638  # MISC's own count for it


def misc_example() -> Semantics:
    """The MISC example, read from the shared copy when there is one, else from the copy above."""
    for cand in (os.environ.get("MISC_EXAMPLE_CSV"),
                 Path(__file__).resolve().parent.parent / "shared" / "misc-example" / "GPT-example.csv",
                 "/work/shared/misc-example/GPT-example.csv"):
        if cand and Path(cand).is_file():
            return load_semantics(cand, "example.png")[0]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "GPT-example.csv"
        p.write_text(MISC_EXAMPLE_CSV, encoding="utf-8", newline="")
        return load_semantics(p, "example.png")[0]


def measure(source: str, sem: Semantics) -> dict:
    """One benchmark row."""
    t0 = time.perf_counter()
    codec, params, payload = sc.encode_semantic_layer(sem)
    t1 = time.perf_counter()
    back = sc.decode_semantic_layer(codec, params, payload)
    t2 = time.perf_counter()
    cands = sc.encode_candidates(sem)
    if back.texts() != sem.texts():
        raise AssertionError(f"{source}: the semantic layer did not round-trip")
    raw = sc.misc_raw_bytes(sem)
    brot = len(cands[sc.pb.CODEC_TEXT_BROTLI])
    return {
        "source": source,
        "raw_bytes": raw,
        "brotli_bytes": brot,
        "payload_bytes": len(payload),
        "ratio": round(len(payload) / raw, 4) if raw else 0.0,
        "brotli_ratio": round(brot / raw, 4) if raw else 0.0,
        "codec": sc.pb.Codec.Name(codec),
        "encode_ms": round((t1 - t0) * 1000, 2),  # all three codecs, and a check decode
        "decode_ms": round((t2 - t1) * 1000, 2),
    }


def _sources(files: list[str]) -> list[tuple[str, Semantics]]:
    if files:
        return [(f, load_semantics(f)[0]) for f in files]
    out = [("MISC GPT-example.csv", misc_example())]
    for p in sorted(SAMPLES.glob("*.json")) if SAMPLES.is_dir() else []:
        out.append((f"samples/{p.name}", load_semantics(p)[0]))
    return out


def load_text_set(path: Path) -> list[Semantics]:
    """The texts of one set file: {"texts": [sidecar, ...]} (boxes optional)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        texts = data["texts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MiscError(f"{path}: not a text set ({type(e).__name__})") from None
    return [semantics_from_dict(t, f"{path}: texts[{i}]") for i, t in enumerate(texts)]


def run_sets(as_json: bool) -> int:
    results = []
    for name in ("plain", "mixed", "tuning"):
        texts = load_text_set(TEXT_SETS / f"{name}.json")
        rows = [measure(f"{name}[{i}]", sem) for i, sem in enumerate(texts)]
        payload = sum(r["payload_bytes"] for r in rows)
        raw = sum(r["raw_bytes"] for r in rows)
        brot = sum(r["brotli_bytes"] for r in rows)
        target = SET_TARGETS.get(name)
        results.append({"set": name, "texts": len(rows), "raw_bytes": raw, "payload_bytes": payload,
                        "brotli_bytes": brot, "ratio": round(payload / raw, 4),
                        "brotli_ratio": round(brot / raw, 4),
                        "worst": max(r["ratio"] for r in rows), "target": target,
                        "pass": target is None or payload / raw <= target, "rows": rows})
    ok = all(r["pass"] for r in results)
    if as_json:
        print(json.dumps(results, indent=2))
        return 0 if ok else 1
    print(f"{'set':<8} {'texts':>5} {'raw':>6} {'brotli':>6} {'ours':>6}  {'ours/raw':>8} {'brotli/raw':>10} "
          f"{'worst':>6}  target")
    for r in results:
        verdict = "-" if r["target"] is None else f"<= {r['target']}: {'PASS' if r['pass'] else 'FAIL'}"
        print(f"{r['set']:<8} {r['texts']:>5} {r['raw_bytes']:>6} {r['brotli_bytes']:>6} {r['payload_bytes']:>6}  "
              f"{r['ratio']:>8.3f} {r['brotli_ratio']:>10.3f} {r['worst']:>6.3f}  {verdict}")
    print(f"text sets: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m miscnet.experiments.bench_semantic",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help=".json sidecars or MISC .csv files (default: the MISC example "
                    "and src/miscnet/core/samples/*.json)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--target", type=float, default=TARGET, help="ratio to pass (default %(default)s)")
    ap.add_argument("--sets", action="store_true", help="the held-out text sets in experiments/semantic_texts/")
    args = ap.parse_args(argv)
    if args.sets:
        sc._lexicon()
        try:
            return run_sets(args.json)
        except MiscError as e:
            print(f"bench_semantic: {e}", file=sys.stderr)
            return 2
    try:
        sources = _sources(args.files)
    except MiscError as e:
        print(f"bench_semantic: {e}", file=sys.stderr)
        return 2
    sc._lexicon()  # build the static model before timing anything
    rows = [measure(name, sem) for name, sem in sources]
    ok = all(r["ratio"] <= args.target for r in rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0 if ok else 1
    w = max(len(r["source"]) for r in rows)
    print(f"{'source':<{w}}  {'raw':>5} {'brotli':>6} {'ours':>5}  {'ours/raw':>8} {'brotli/raw':>10}  "
          f"{'codec':<20} {'enc ms':>6} {'dec ms':>6}")
    for r in rows:
        print(f"{r['source']:<{w}}  {r['raw_bytes']:>5} {r['brotli_bytes']:>6} {r['payload_bytes']:>5}  "
              f"{r['ratio']:>8.3f} {r['brotli_ratio']:>10.3f}  {r['codec']:<20} {r['encode_ms']:>6.1f} "
              f"{r['decode_ms']:>6.1f}")
    mean = sum(r["ratio"] for r in rows) / len(rows)
    mean_b = sum(r["brotli_ratio"] for r in rows) / len(rows)
    if not args.files:
        ex = rows[0]
        print(f"(MISC counts {MISC_EXAMPLE_CHARS} chars for its example, without the names; "
              f"against that ours is {ex['payload_bytes'] / MISC_EXAMPLE_CHARS:.3f})")
    print(f"mean ratio {mean:.3f} (brotli {mean_b:.3f}), worst {max(r['ratio'] for r in rows):.3f}, "
          f"target <= {args.target}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


__all__ = ["load_text_set", "main", "measure", "misc_example", "run_sets"]

if __name__ == "__main__":
    sys.exit(main())
