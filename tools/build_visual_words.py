"""Build src/miscnet/core/data/visual_words.txt: English words that name things one can see.

    python tools/build_visual_words.py [--wordnet /usr/share/wordnet] [--out PATH]

Source: WordNet 3.0 (Princeton University; the WordNet 3.0 licence, a permissive BSD-style licence whose
copyright notice the generated file repeats), Debian package ``wordnet-base``. A word is listed when at
least half of the WordNet senses of one of its lemmas (the word itself or the lemma that a regular or
listed irregular inflection leads to: trays -> tray, loaves -> loaf, stacked -> stack) fall in the
lexicographer files of concrete things and visible actions (noun.animal, noun.artifact, noun.body,
noun.food, noun.object, noun.person, noun.phenomenon, noun.plant, noun.shape, noun.substance and
verb.body, verb.contact, verb.motion, verb.perception, verb.weather), and wordfreq's English list
(3.1.1) has it above frequency 10**-6. The semantic codec's word model makes these words likelier
(semantic_codec._VISUAL_BOOST); the file is part of the coded format (its checksum is pinned).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONCRETE = {5, 6, 8, 13, 17, 18, 19, 20, 25, 27, 29, 35, 38, 39, 43}  # lexicographer file numbers
MIN_BUCKET = 600  # wordfreq bucket b holds words of frequency 10**(-b/100)
OUT = Path(__file__).resolve().parent.parent / "src" / "miscnet" / "core" / "data" / "visual_words.txt"
HEADER = """\
# Words that name things one can see (built by tools/build_visual_words.py from WordNet 3.0 and
# wordfreq 3.1.1's English list; do not edit by hand). Part of the semantic codec's coded format.
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE
# IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
# IMPLIED. (WordNet 3.0 licence: https://wordnet.princeton.edu/license-and-commercial-use)
"""


def lemma_senses(wn: Path) -> dict[str, tuple[int, int]]:
    """lemma -> (concrete senses, all senses) over the four data files."""
    out: dict[str, tuple[int, int]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wn / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            f = line.split(" ")
            lexfile, n = int(f[1]), int(f[3], 16)
            for i in range(n):
                w = f[4 + 2 * i].lower()
                if "_" not in w:
                    a, b = out.get(w, (0, 0))
                    out[w] = (a + (lexfile in CONCRETE), b + 1)
    return out


def exceptions(wn: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for pos in ("noun", "verb", "adj"):
        for line in (wn / f"{pos}.exc").read_text(encoding="latin-1").splitlines():
            p = line.split()
            if len(p) >= 2:
                out.setdefault(p[0], p[1])
    return out


def lemmas(w: str, exc: dict[str, str]) -> list[str]:
    c = [w]
    if w in exc:
        c.append(exc[w])
    if w.endswith("s"):
        c.append(w[:-1])
    if w.endswith("es"):
        c.append(w[:-2])
    if w.endswith("ies"):
        c.append(w[:-3] + "y")
    if w.endswith("ves"):
        c += [w[:-3] + "f", w[:-3] + "fe"]
    if w.endswith("ed"):
        c += [w[:-2], w[:-1], w[:-3]]
    if w.endswith("ing"):
        c += [w[:-3], w[:-3] + "e", w[:-4]]
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        print(f"build_visual_words: no WordNet data in {args.wordnet} (apt-get install wordnet-base)",
              file=sys.stderr)
        return 2
    import wordfreq

    senses = lemma_senses(args.wordnet)
    exc = exceptions(args.wordnet)
    keep = []
    for bucket in wordfreq.get_frequency_list("en")[:MIN_BUCKET]:
        for w in bucket:
            if not (w.isascii() and w.isalpha() and w.islower()):
                continue
            if any(a * 2 >= b > 0 for a, b in (senses.get(lem, (0, 0)) for lem in lemmas(w, exc))):
                keep.append(w)
    args.out.write_text(HEADER + "\n".join(sorted(set(keep))) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(set(keep))} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
