"""
Tasks and batches: a task (the world's, world.py, or your own .jsonl files, task_files.py) as Examples
split three ways, their token ids, and the batches that the loop and the metrics use.

    task = load_task(TaskOptions(task="reviews.jsonl"))  # or "qa", "sentiment", a folder of splits
    encode_task(task, enc, block_size=128)  # token ids on every example, long inputs cut to fit
    idx, targets = next(batches(task, batch_size=32, seed=0, device="cpu"))

An Example is an input text and the answer the model should give: a label word (" positive") for a
classification task, free text (" The birthplace of Ada Holm is Lima.") otherwise.
"""
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

from kit import chat, task_files, world
from kit.options import Options, option

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"
# at most this many distinct answers, each on MIN_PER_LABEL lines or more: classification
MAX_LABELS = 20
SPLITS = ("train", "val", "test", "ood")  # the splits a digest covers
MIN_PER_LABEL = 3


@dataclass
class TaskOptions(Options):
    task: str = option("qa", "qa, sentiment, a .jsonl file of prompt/completion or text/label "
                             "lines, or a folder holding train.jsonl and optionally val.jsonl, "
                             "test.jsonl, ood.jsonl")
    val: str = option(None,
                      "a .jsonl file of validation examples (default: 10%% of --task's lines)")
    test: str = option(None, "a .jsonl file of test examples (default: 10%% of --task's lines)")
    ood: str = option(None, "a .jsonl file of out-of-distribution test examples: another domain "
                            "or wording")
    template: str = option(DEFAULT_TEMPLATE, "the input made of text/label lines; {text} is "
                                             "replaced, \\n is a newline")
    metric: str = option("auto", "auto: accuracy of the likeliest label when the answers are a few "
                                 "labels, else exact match",
                         choices=("auto", "accuracy", "exact_match"))
    people: int = option(200, "people in the generated world (qa, sentiment)", least=10,
                             most=world.MOST_PEOPLE)
    heldout: str = option(None, "a UTF-8 text the model was not tuned on: its loss measures "
                                "forgetting (default: the world's tasks have documents of their "
                                "own; with --data, the 5%% that pretraining held out)")
    chat: bool = option(False, "wrap each input in the base's chat template (an Instruct model's "
                               "ChatML, kit/chat.py), as the model was tuned to be asked")

    def __post_init__(self):
        super().__post_init__()
        self.template = self.template.replace("\\n", "\n")  # the command line's \n is a newline
        if "{text}" not in self.template:
            raise ValueError(f"--template must contain {{text}}, where each line's text goes; "
                             f"got {self.template!r}")
        # {text} is its only placeholder: anything else in braces would stay in every input as typed
        t = self.template
        other = ([b for b in ("{{", "}}") if b in t] or
                 re.findall(r"\{[^{}]*\}", t.replace("{text}", "")))
        if other:
            raise ValueError(f"--template may only hold the placeholder {{text}}; {other[0]!r} "
                             f"in {self.template!r} would be kept as typed: remove it")


@dataclass(slots=True)
class Example:
    input: str
    answer: str
    line: int = 0              # its line in your .jsonl file (0: generated)
    input_ids: list = None     # filled by encode_task
    answer_ids: list = None    # the answer's tokens
                               # (+ EOT for free text, so the model learns to stop)


@dataclass
class Task:
    """A fine-tuning task: lists of Examples, split three ways, and what is needed to score them."""
    name: str
    train: list
    val: list
    test: list
    choices: list = None   # label words (" positive", ...): a classification task, scored by
                           # the likeliest
    ood: list = None       # test examples unlike the training ones: another wording,
                           # or another domain
    probe: list = None     # qa: the test facts asked in the pretraining text's own words
                           # (what the base knows)
    heldout: list = None   # documents pretraining never saw: the loss on them measures forgetting
    labelled: bool = False  # made of text/label lines (through --template)
    chat: bool = False     # inputs wrapped in the base's chat template (--chat)
    truncated: int = 0     # inputs cut to fit the context (their ends kept)
    overlaps: list = None  # "3 of 200 test examples are in train too": printed with the splits
    # filled by encode_task: the tokens of each label word, the held-out text as rows, EOT,
    # the tokenizer
    choice_ids: list = None
    heldout_rows: list = None
    eot: int = None
    encode: object = None
    decode: object = None

    @property
    def metric(self):
        return "accuracy" if self.choices else "exact_match"

    def label_counts(self, split="train"):
        return Counter(ex.answer for ex in getattr(self, split))

    def describe(self):
        """Lines for the log: the splits, the label set with its counts, and how many inputs were
        cut."""
        sizes = {s: len(getattr(self, s) or []) for s in ("train", "val", "test", "ood")}
        yield f"{self.name}: " + ", ".join(f"{n:,} {s}" for s, n in sizes.items() if n)
        if self.choices:
            counts = self.label_counts()
            yield (f"{self.name}: classification over {len(self.choices)} labels (train counts: "
                   + ", ".join(f"{c.strip()!r} {counts[c]}" for c in self.choices) + ")")
        for note in self.overlaps or []:
            yield f"{self.name}: {note} (the same input and answer)"
        if self.truncated:
            yield f"{self.name}: cut {self.truncated} inputs to fit the context, keeping their ends"

    def digest(self):
        """The task's token ids: what the model was given (a changed file or tokenizer changes
        them)."""
        return hashlib.sha1(json.dumps([(ex.input_ids, ex.answer_ids) for s in SPLITS
                                        for ex in getattr(self, s) or []]).encode()).hexdigest()[:8]

    def majority(self):
        """What always answering the commonest training label scores on the test split: the floor to
        beat."""
        if not self.choices:
            return None
        top = self.label_counts().most_common(1)[0][0]
        return sum(ex.answer == top for ex in self.test) / len(self.test)


def saved_options(ckpt):
    """A checkpoint's task options: a run saved before --chat existed was not chat-formatted, and
    one saved before --people was named so called it world_size."""
    opts = {"chat": False, **ckpt["task"]["options"]}
    if "world_size" in opts:
        opts["people"] = opts.pop("world_size")
    return opts


SPLIT_SEED = 1337  # the split's own seed: --seed changes the training, never which lines are test


def load_task(opts):
    """The task the options name. A file without a given val or test split gives 10% of its lines to
    each missing one after a shuffle seeded by SPLIT_SEED (80/10/10 when both are missing).
    Classification is detected, not configured: answers that take at most 20 values, each on at
    least 3 lines, are label words, scored by the likeliest label (accuracy); otherwise the greedy
    answer must match exactly (text/label lines that fail this are refused). --metric overrides
    that. opts may be a task's name or path alone."""
    if isinstance(opts, (str, os.PathLike)):
        opts = TaskOptions(task=opts)
    if not isinstance(opts, TaskOptions):
        raise ValueError(f"load_task(): opts must be a TaskOptions (or a task's name), got "
                         f"{type(opts).__name__}")
    if opts.task in ("qa", "sentiment"):
        if opts.val or opts.test or opts.ood:
            raise ValueError(f"the {opts.task} task comes split: leave out --val, --test and --ood")
        made = world.make_task(opts.task, world.make_world(opts.people))
        splits = {s: [Example(*pair) for pair in made[s]]
                  for s in ("train", "val", "test", "ood", "probe") if s in made}
        task = Task(opts.task, **splits, choices=made.get("choices"), heldout=made["heldout"],
                    chat=opts.chat)
        if opts.metric == "exact_match" or (opts.metric == "accuracy" and not task.choices):
            raise ValueError(f"--metric {opts.metric} does not fit the {opts.task} task: "
                             f"leave out --metric")
        return task
    files = task_files.split_files(opts)
    read = {s: task_files.read_examples(f, opts.template) for s, f in files.items()}
    splits = {s: [Example(text, answer, line=i) for text, answer, i in rows]
              for s, (rows, _) in read.items()}
    exs, n = splits["train"], len(splits["train"])
    random.Random(SPLIT_SEED).shuffle(exs)
    missing = [s for s in ("val", "test") if s not in splits]
    if missing and n < 10:
        raise ValueError(f"task file {files['train']!r} has {n} examples: at least 10 are needed "
                         f"to split off {' and '.join(missing)} (or give --val and --test)")
    cuts = {"val": (8, 9), "test": (9, 10)} if len(missing) == 2 else {s: (9, 10) for s in missing}
    for s, (a, b) in cuts.items():  # tenths of the shuffled file: 80/10/10 when both are missing
        splits[s] = exs[n * a // 10:n * b // 10]
    splits["train"] = exs[:n * min([a for a, _ in cuts.values()] or [10]) // 10]
    overlaps = task_files.check_overlap(splits, files)
    counts = Counter(ex.answer for s in ("train", "val", "test") for ex in splits[s])
    labels = len(counts) <= MAX_LABELS and min(counts.values()) >= MIN_PER_LABEL
    labelled = any(labelled for _, labelled in read.values())
    if labelled and not labels and opts.metric == "auto":  # text/label lines that aren't labels
        rare = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))[:3]
        why = (f"{len(counts)} labels (at most {MAX_LABELS} make a classification task)"
               if len(counts) > MAX_LABELS else
               "labels with fewer than {} lines: {}".format(MIN_PER_LABEL, ", ".join(
                   f"{k.strip()!r} {v}" for k, v in rare if v < MIN_PER_LABEL)))
        raise ValueError(f"{files['train']}: text/label lines with {why}; add lines, or pass "
                         f"--metric exact_match to score the labels as generated text")
    choices = (sorted(counts) if opts.metric == "accuracy" or (opts.metric == "auto" and labels)
               else None)
    if choices:
        task_files.check_labels(splits, files)
    name = os.path.basename(os.path.normpath(opts.task))
    return Task(name, **splits, choices=choices, labelled=labelled, overlaps=overlaps,
                chat=opts.chat)


# --------------------------------------------------------------------------------------------------
# Token ids and batches

def encode_task(task, enc, block_size, reserved=0):
    """Token ids on every example. Each must fit the context with `reserved` positions in front (a
    soft prompt): an input that is too long is cut from the left, keeping its end (where the
    question and its cue are), and counted in task.truncated; an answer that leaves no room for an
    input is an error naming its line."""
    for value, least, what in ((block_size, 2, "block_size"), (reserved, 0, "reserved")):
        if type(value) is not int or value < least:
            raise ValueError(f"encode_task(): {what} must be a whole number of at least {least}, "
                             f"got {value!r}")
    if not isinstance(task, Task) or not hasattr(enc, "eot"):  # tiktoken's own: no end-of-text id
        raise ValueError(f"encode_task(): give a Task and a tokenizer (kit.tokenizer.load), got "
                         f"{type(task).__name__} and {type(enc).__name__}")
    task.eot, task.encode, task.decode = enc.eot, enc.encode_ordinary, enc.decode
    wrap = chat.ChatML.of(enc) if task.chat else None  # --chat: as an Instruct model is asked
    if wrap:  # its turn ends at <|im_end|>: so does a free-text answer, and generation stops there
        task.eot = wrap.end
    length = heldout_length(block_size, reserved)
    task.heldout_rows = text_rows(task.heldout, enc, length) if task.heldout else None
    task.choice_ids = [enc.encode_ordinary(c) for c in task.choices] if task.choices else None
    longest_label = max(map(len, task.choice_ids)) if task.choices else 0
    task.truncated = 0
    for split in ("train", "val", "test", "ood", "probe"):
        exs = getattr(task, split) or []
        # one call per string: tiktoken's encode_ordinary_batch pays a thread-pool task per string,
        # 14x slower
        # text that looks like EOT stays text
        inputs = [wrap.encode(ex.input) if wrap else enc.encode_ordinary(ex.input) for ex in exs]
        answers = [enc.encode_ordinary(ex.answer) for ex in exs]
        for ex, p, c in zip(exs, inputs, answers):
            # A label is scored, never generated: it trains alone. Free text ends in EOT, where
            # generation stops (a base pretrained on text without EOT would otherwise spend a
            # label's loss on it).
            c = c if task.choices else c + [task.eot]
            room = block_size - reserved - max(len(c), longest_label)
            if room < 1:
                where = f"line {ex.line}" if ex.line else f"a {split} example"
                raise ValueError(f"{task.name} {where}: its answer is {len(c)} tokens "
                                 f"(+{reserved} soft prompt), which leaves no room for the input "
                                 f"in the context of {block_size}: shorten it, or the soft "
                                 f"prompt (--prompt-len), or raise --block-size (a base of ours "
                                 f"is pretrained anew for another --block-size)")
            if len(p) > room:
                # (in a chat's template: the end of the text, and the template around it)
                p = wrap.cut(p, room) if wrap else p[-room:]
                task.truncated += split != "probe"
            ex.input_ids, ex.answer_ids = p, c
    return task


def collate(rows, device, pad):
    """rows of (input ids, answer ids) -> idx (B, T) and targets (B, T): -1 except on answer tokens.
    Rows are padded on the right, which causal attention never looks at."""
    T = max(len(p) + len(c) for p, c in rows) - 1
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    tgt = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = p + c
        idx[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        tgt[i, len(p) - 1:len(seq) - 1] = torch.tensor(c)  # position t predicts token t + 1
    return idx.to(device), tgt.to(device)


def inputs_only(exs, device, pad):
    """The inputs alone, padded on the right: idx (B, T) and each row's last input position (B,)."""
    idx, _ = collate([(ex.input_ids, [pad]) for ex in exs], device, pad)
    return idx, torch.tensor([len(ex.input_ids) - 1 for ex in exs], device=device)


def make_batch(exs, task, device, classifier=False):
    """(idx, targets) for the language-modelling loss on the answers; with a classification layer,
    targets hold each label's index at its input's last position (classifier.py reads the hidden
    state there)."""
    if not classifier:
        return collate([(ex.input_ids, ex.answer_ids) for ex in exs], device, task.eot)
    idx, last = inputs_only(exs, device, task.eot)
    targets = torch.full_like(idx, -1)
    targets[torch.arange(len(exs), device=device), last] = torch.tensor(
        [task.choices.index(ex.answer) for ex in exs], device=device)
    return idx, targets


def batches(task, batch_size, seed, device, classifier=False):
    """Training batches without end: batch_size examples of task.train drawn with replacement,
    seeded."""
    if not task.train or task.train[0].input_ids is None:
        raise ValueError("the task has no token ids yet: "
                         "call data.encode_task(task, enc, block_size) first")
    rng = random.Random(seed)
    while True:
        yield make_batch(rng.choices(task.train, k=batch_size), task, device, classifier)


def corpus_batches(ids, block_size, batch_size, seed, device):
    """Pretraining batches without end: random windows of the corpus; the targets are the next
    tokens."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ix = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([ids[i:i + block_size] for i in ix]).to(device)
        yield x, torch.stack([ids[i + 1:i + 1 + block_size] for i in ix]).to(device)


def heldout_length(block_size, reserved):
    """Tokens per row of held-out text: half the context, so that a soft prompt of up to half of it
    fits beside the rows, and forgetting is measured on the same rows before and after."""
    return max(1, min(block_size // 2, block_size - reserved - 1))


ROWS, TOKENS = 256, 1 << 14  # held-out text: at most 256 rows, and at most 16,384 tokens in all


def window_rows(ids, length, limit=None):
    """A long tensor of token ids -> back-to-back windows (at most limit, default: as many as ROWS
    and TOKENS allow), in text_rows' format."""
    limit = limit or min(ROWS, max(1, TOKENS // length))
    starts = range(0, len(ids) - length, length)[:limit]  # each: 1 + length
    return [(ids[i:i + 1].tolist(), ids[i + 1:i + length + 1].tolist()) for i in starts]


def text_rows(docs, enc, length):
    """Documents -> rows (as many as ROWS and TOKENS allow) of (first token, the rest) of at most
    `length` + 1 tokens, for a language-modelling loss on every token after the first (collate's
    format)."""
    rows = []
    for ids in map(enc.encode_ordinary, docs):
        rows += [(ids[i:i + 1], ids[i + 1:i + length + 1]) for i in range(0, len(ids) - 1, length)]
    return rows[:min(ROWS, max(1, TOKENS // length))]


def check_inputs(model, task, who, classifier=False):
    """One line, before any work, for what would fail deep inside (a notebook's call): a model
    without weights (the meta device) or not in float32, a task without token ids, with ids past
    the model's vocabulary (encoded by another tokenizer), without test examples, or without labels
    for a classification layer."""
    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise ValueError(f"{who}: the model is on the meta device (it has no weights): build or "
                         f"load it on a real one")
    if {p.dtype for p in params} != {torch.float32}:
        raise ValueError(f"{who}: the model's weights are {params[0].dtype}, not float32 (bfloat16 "
                         f"runs as autocast, dtype=\"bfloat16\"): call model.float() first")
    splits = [ex for s in ("train", "val", "test", "ood", "probe") for ex in getattr(task, s) or []]
    if task.eot is None or any(ex.input_ids is None for ex in splits):
        raise ValueError("the task has no token ids yet: "
                         "call data.encode_task(task, enc, block_size) first")
    if not task.test:
        raise ValueError(f"{who}: the task {task.name} has no test examples: give it some")
    if classifier and not task.choices:
        raise ValueError(f"{who}: a classification layer needs a classification task, and "
                         f"{task.name}'s answers are free text: leave out the classifier")
    top = max([task.eot, *(max(ex.input_ids + ex.answer_ids, default=0) for ex in splits)])
    if top >= model.config.vocab_size:
        raise ValueError(f"{who}: the task holds token id {top:,}, past the model's vocabulary of "
                         f"{model.config.vocab_size:,}: it was encoded with another tokenizer than "
                         f"the model's; encode it with the model's")
