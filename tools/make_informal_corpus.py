"""Write the three informal-English pretraining texts of assets/corpus/ from package files.

The bundled model's first corpus (Shakespeare, The Verdict, WordNet glosses) lacks the modern,
informal English of text messages: numbers, abbreviations, computer and money words. These texts
add short jokes, quips, dialogue and hacker slang:

- fortunes.txt: the English fortune-cookie files of Debian's `fortunes-min`, `fortunes` and
  `fortunes-bofh-excuses` packages (all in Debian main), without the two ASCII-art files. Each
  fortune is one paragraph, and the files follow in name order.
- chatterbot-english.txt: the English conversations of the `chatterbot-corpus` wheel on PyPI
  (BSD-3-Clause), one conversation per paragraph, one utterance per line, the files in name order.
- jargon-file.txt: the Jargon File 4.4.7 (public domain), the plain-text edition in Debian's
  `jargon-text` package, unchanged.

Usage, with the package versions the bundled files came from:

    apt-get download fortunes-min=1:1.99.1-7.3 fortunes=1:1.99.1-7.3 \\
        fortunes-bofh-excuses=1.2-3 jargon-text=4.4.7-4.1
    for f in *.deb; do dpkg-deb -x "$f" pkgs; done
    pip download --no-deps chatterbot-corpus==1.3.3 && unzip -q chatterbot_corpus-*.whl -d pkgs
    python3 tools/make_informal_corpus.py pkgs assets/corpus

Needs PyYAML for the conversations.
"""
import gzip
import os
import sys

import yaml

SKIPPED_FORTUNES = {"art", "ascii-art"}


def fortunes(root):
    directory = os.path.join(root, "usr/share/games/fortunes")
    names = sorted(n for n in os.listdir(directory) if "." not in n and n not in SKIPPED_FORTUNES)
    entries = []
    for name in names:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            text = f.read()
        # A line that contains only "%" separates two fortunes.
        for entry in text.split("\n%\n"):
            if entry.strip():
                entries.append(entry.strip("\n").rstrip())
    return "\n\n".join(entries) + "\n"


def conversations(root):
    directory = os.path.join(root, "chatterbot_corpus/data/english")
    paragraphs = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".yml"):
            continue
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for conversation in data.get("conversations", []):
            paragraphs.append("\n".join(str(utterance).strip() for utterance in conversation))
    return "\n\n".join(paragraphs) + "\n"


def jargon(root):
    with gzip.open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz")) as f:
        return f.read()


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make_informal_corpus.py PACKAGES_DIR OUT_DIR")
    root, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(out, "fortunes.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(fortunes(root))
    with open(os.path.join(out, "chatterbot-english.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(conversations(root))
    with open(os.path.join(out, "jargon-file.txt"), "wb") as f:
        f.write(jargon(root))


if __name__ == "__main__":
    main()
