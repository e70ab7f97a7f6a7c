"""Write assets/corpus/wordnet-glosses.txt from the WordNet 3.0 database.

The bundled model's pretraining corpus pairs Shakespeare with these glosses so that the
vocabulary of modern English (reviews, messages) occurs at least once: Shakespeare alone never
contains almost half of the distinct tokens of the sentiment sentences.

Input: the `data.noun`, `data.verb`, `data.adj`, `data.adv` and `cntlist.rev` files of Debian's
`wordnet-base` package (1:3.0-37), e.g.

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wn
    python3 tools/make_wordnet_glosses.py wn/usr/share/wordnet assets/corpus/wordnet-glosses.txt

Kept: every synset with at least one lemma that `cntlist.rev` counts (a word sense tagged in the
SemCor texts), written as `lemma, lemma: gloss; "example"`, one per line. The lines are shuffled
with a fixed seed, so the held-out tail of the file samples every part of speech.
"""
import os
import random
import sys


def tagged_lemmas(path):
    lemmas = set()
    with open(path, encoding="ascii") as f:
        for line in f:
            key, _sense, count = line.split()
            if int(count) >= 1:
                lemmas.add(key.split("%")[0])
    return lemmas


def synsets(path):
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16)
            # Adjective lemmas may carry a syntactic marker such as "(a)" or "(p)".
            lemmas = [fields[4 + 2 * i].split("(")[0] for i in range(count)]
            yield lemmas, gloss.strip()


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make_wordnet_glosses.py WORDNET_DIR OUT_FILE")
    src, out = sys.argv[1], sys.argv[2]
    tagged = tagged_lemmas(os.path.join(src, "cntlist.rev"))
    lines = []
    for pos in ("noun", "verb", "adj", "adv"):
        for lemmas, gloss in synsets(os.path.join(src, "data." + pos)):
            if not any(l.lower() in tagged for l in lemmas):
                continue
            words = dict.fromkeys(l.replace("_", " ") for l in lemmas)
            lines.append(", ".join(words) + ": " + gloss)
    random.Random(0).shuffle(lines)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out)
    print(f"{out}: {len(lines)} synsets", file=sys.stderr)


if __name__ == "__main__":
    main()
