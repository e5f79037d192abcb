"""Build src/miscnet/core/data/word_bigrams.txt: which words follow the commonest English words.

    python tools/build_word_bigrams.py [--wordnet /usr/share/wordnet] [--out PATH]

Source: the glosses and example sentences of WordNet 3.0 (about 1.6 million words of plain descriptive
English: "a large white bird with a long neck"; Princeton University, the WordNet 3.0 licence, a
permissive BSD-style licence whose copyright notice the generated file repeats), Debian package
``wordnet-base``. Text is lower-cased and cut into words ([a-z]+), numbers (``<n>``), commas and
colons (``<,>``) and sentence starts (``<s>``); any other character breaks the chain. ``<w>`` is the
context of every word that is not a context of its own.

One line per context: the context, the number of words that followed it, the number of distinct ones,
then its commonest followers with their counts (the ``CONTEXTS`` commonest words and the four marks,
``FOLLOWERS`` followers each). The semantic codec's word model mixes these with its unigram model
(semantic_codec._bigrams); the file is part of the coded format (its checksum is pinned).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

CONTEXTS = 300
FOLLOWERS = 80
OUT = Path(__file__).resolve().parent.parent / "src" / "miscnet" / "core" / "data" / "word_bigrams.txt"
HEADER = """\
# Followers of the commonest English words (built by tools/build_word_bigrams.py from the glosses of
# WordNet 3.0; do not edit by hand). Part of the semantic codec's coded format.
# Each line: context, followers seen, distinct followers, then follower count pairs.
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE
# IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
# IMPLIED. (WordNet 3.0 licence: https://wordnet.princeton.edu/license-and-commercial-use)
"""
_TOKEN = re.compile(r"[a-z]+|[0-9]+|[.!?;]|[,:]|\S")


def sentences(wn: Path):
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wn / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            yield line.split("|", 1)[1]


def tokens(text: str) -> list[str | None]:
    out: list[str | None] = ["<s>"]
    for t in _TOKEN.findall(text.lower()):
        if t[0].isalpha():
            out.append(t)
        elif t[0].isdigit():
            out.append("<n>")
        elif t in ".!?;":
            out.append("<s>")
        elif t in ",:":
            out.append("<,>")
        else:
            out.append(None)  # a quote or bracket: no bigram across it
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        print(f"build_word_bigrams: no WordNet data in {args.wordnet} (apt-get install wordnet-base)",
              file=sys.stderr)
        return 2
    uni: collections.Counter[str] = collections.Counter()
    follow: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for gloss in sentences(args.wordnet):
        toks = tokens(gloss)
        for a, b in zip(toks[:-1], toks[1:], strict=True):
            if a is not None and b is not None and b[0] != "<":
                follow[a][b] += 1
        uni.update(t for t in toks if t is not None and t[0] != "<")
    words = [w for w, _ in uni.most_common(CONTEXTS)]
    other = follow["<w>"]  # the followers of every word that is not a context of its own
    for w in set(follow) - set(words):
        if w[0] != "<":
            other.update(follow[w])
    contexts = ["<s>", "<,>", "<n>", "<w>"] + words
    lines = []
    for ctx in contexts:
        f = follow[ctx]
        top = sorted(f.items(), key=lambda kv: (-kv[1], kv[0]))[:FOLLOWERS]
        lines.append(" ".join([ctx, str(sum(f.values())), str(len(f))] + [f"{w} {c}" for w, c in top]))
    args.out.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(lines)} contexts, {sum(len(x.split()) - 3 for x in lines) // 2} followers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
