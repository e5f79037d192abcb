"""Build src/miscnet/core/data/word_associations.txt: for words that image descriptions use, the words
that tend to come with them.

    python tools/build_word_associations.py [--wordnet /usr/share/wordnet] [--out PATH]

Source: WordNet 3.0 (Princeton University; the WordNet 3.0 licence, a permissive BSD-style licence whose
copyright notice the generated file repeats), Debian package ``wordnet-base``, and wordfreq 3.1.1's
English list. Each WordNet synset is a small document: its words and the words of its gloss without
the example sentences ("bakery: a workplace where baked goods (breads and cakes and pastries) are
produced or sold"). A head word's associates are the words that share most documents with it, each
weighed by how rare it is (count * log(documents / documents with it)); heads are the words of
data/caption_words.txt and data/visual_words.txt among the ``HEAD_WORDS`` commonest English words,
associates any word of wordfreq's English list above frequency 10**-6 that is not one of the ``SKIP``
commonest words. The semantic codec's word model makes the associates of the words already sent
likelier (semantic_codec._ASSOC_WEIGHT); the file is part of the coded format (its checksum is pinned).
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys
from pathlib import Path

ASSOCIATES = 14
SKIP = 150
MIN_BUCKET = 600
HEAD_WORDS = 8000  # heads: among the commonest English words
DATA = Path(__file__).resolve().parent.parent / "src" / "miscnet" / "core" / "data"
HEADER = """\
# Words that come with the words image descriptions use (built by tools/build_word_associations.py from
# WordNet 3.0 and wordfreq 3.1.1; do not edit by hand). Each line: a head word, then its associates,
# the strongest first. Part of the semantic codec's coded format.
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE
# IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
# IMPLIED. (WordNet 3.0 licence: https://wordnet.princeton.edu/license-and-commercial-use)
"""


def listed(path: Path) -> set[str]:
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        out.update(w for w in line.split("#", 1)[0].split() if w.isascii() and w.isalpha() and w.islower())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=DATA / "word_associations.txt")
    args = ap.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        print(f"build_word_associations: no WordNet data in {args.wordnet} (apt-get install wordnet-base)",
              file=sys.stderr)
        return 2
    import wordfreq

    common: list[str] = []
    for bucket in wordfreq.get_frequency_list("en")[:MIN_BUCKET]:
        common += [w for w in bucket if w.isascii() and w.isalpha() and w.islower()]
    skip = set(common[:SKIP])
    vocab = set(common) - skip
    head_vocab = set(common[:HEAD_WORDS])
    heads = (listed(DATA / "caption_words.txt") | listed(DATA / "visual_words.txt")) & vocab & head_vocab
    docs: list[set[str]] = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (args.wordnet / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            f = line.split(" ")
            words = set()
            for i in range(int(f[3], 16)):
                words.update(f[4 + 2 * i].lower().split("_"))
            gloss = re.sub(r'"[^"]*"', " ", line.split("|", 1)[1])  # the definition, not the examples
            words.update(re.findall(r"[a-z]+", gloss.lower()))
            words &= vocab
            if len(words) > 1:
                docs.append(words)
    df: collections.Counter[str] = collections.Counter()
    co: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for d in docs:
        df.update(d)
        for h in d & heads:
            co[h].update(d - {h})
    n = len(docs)
    lines = []
    for h in sorted(co):
        score = {w: c * math.log(n / df[w]) for w, c in co[h].items()}
        top = sorted(score, key=lambda w: (-score[w], w))[:ASSOCIATES]
        lines.append(" ".join([h] + top))
    args.out.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(lines)} heads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
