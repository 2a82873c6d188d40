"""
Chat templates: how an Instruct model was tuned to be asked. Its files carry the layout of a
conversation as a Jinja template (tokenizer.chat_template: in a .gguf's metadata, or a hub folder's
tokenizer_config.json; the tokenizer keeps it, bases.tokenizer_of). Jinja is not a dependency; the
templates of SmolLM2 and Qwen2.5 are ChatML, which is recognised here and written out as the
template writes one user message with add_generation_prompt (checked byte for byte against
transformers' apply_chat_template on both models' files):

    <|im_start|>system\n{its default system message}<|im_end|>\n
    <|im_start|>user\n{text}<|im_end|>\n
    <|im_start|>assistant\n

    chat = ChatML.of(enc)                 # the tokenizer's template, or a one-line refusal
    chat.text("What is 2 + 2?")           # the string above
    ids = chat.encode("What is 2 + 2?")   # the markers as their special tokens, the rest as text
The model's turn ends with <|im_end|> (chat.end): generation stops there, and a chat-formatted
task's answers end with it (--chat, data.encode_task). Any other template is refused in one line.
"""
import os
import re
from dataclasses import dataclass

from kit import task_files

START, END = "<|im_start|>", "<|im_end|>"
# Jinja's string literals, in single or double quotes, with backslash escapes
LITERAL = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""", re.S)
NL = r"'(?:\\n|\n)'"  # '\n' in a template: the escape, or a newline typed inside the quotes
# ChatML's one line per message, as SmolLM2's (message['role']) and Qwen2.5's (message.role) write it
MESSAGE = re.compile(
    r"'<\|im_start\|>'\s*\+\s*message(?:\.role|\['role'\])\s*\+\s*" + NL
    + r"\s*\+\s*message(?:\.content|\['content'\])\s*\+\s*'<\|im_end\|>'\s*\+\s*" + NL)
# the literal that writes a default system message: the one the template writes when none is given
SYSTEM = re.compile(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", re.S)


def literals(template):
    """The template's string literals, read as Jinja reads them (\\n is a newline)."""
    return [(a or b).encode("ascii", "backslashreplace").decode("unicode-escape")
            for a, b in LITERAL.findall(template)]


def folder_template(folder):
    """The chat template in a hub folder's tokenizer_config.json, or None (a .gguf's is read with
    its tokenizer: tokenizer.load_gguf)."""
    config = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        config_json = task_files.loads(f.read(), config)  # deep nesting: one line, not a traceback
    if not isinstance(config_json, dict):
        raise ValueError(f"{config} is not a JSON object: its tokenizer config is damaged")
    template = config_json.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat's
        template = {t.get("name"): t.get("template") for t in template
                    if isinstance(t, dict)}.get("default")
    return template


@dataclass
class ChatML:
    """A ChatML template, as its one user message with add_generation_prompt writes it."""
    system: str   # the default system message the template writes before the user's (None: none)
    enc: object   # the tokenizer: the markers are its special tokens
    start: int    # <|im_start|>'s id
    end: int      # <|im_end|>'s id: the model's turn ends there

    @classmethod
    def parse(cls, template, enc, where="the chat template"):
        """A ChatML template recognised, or a one-line refusal."""
        if not isinstance(template, str):
            raise ValueError(f"--chat: {where} carries no chat template (an Instruct model's "
                             f".gguf or tokenizer_config.json has one)")
        strings = literals(template)
        if (not MESSAGE.search(template) or f"{START}assistant\n" not in strings
                or "add_generation_prompt" not in template or "bos_token" in template):
            raise ValueError(f"--chat reads ChatML templates (<|im_start|>role\\n...<|im_end|>, "
                             f"as SmolLM2's and Qwen2.5's); {where}'s is another kind")
        systems = {m.group(1) for m in map(SYSTEM.fullmatch, strings) if m}
        if len(systems) > 1:
            raise ValueError(f"--chat: {where} has {len(systems)} default system messages; "
                             f"it is not ChatML as read here")
        specials = enc._special_tokens
        if START not in specials or END not in specials:
            raise ValueError(f"--chat: the tokenizer has no {START} and {END} special tokens, "
                             f"which its ChatML template needs")
        return cls(next(iter(systems), None), enc, specials[START], specials[END])

    @classmethod
    def of(cls, enc):
        """The template that came with the tokenizer (bases.tokenizer_of), recognised."""
        return cls.parse(getattr(enc, "chat_template", None), enc, f"the tokenizer {enc.name}")

    def text(self, user):
        """The string the template writes for one user message, and the assistant's turn to
        come."""
        system = f"{START}system\n{self.system}{END}\n" if self.system is not None else ""
        return f"{system}{START}user\n{user}{END}\n{START}assistant\n"

    def head(self):
        """The token ids before the user's text: the system message, then <|im_start|>user\\n."""
        e = self.enc.encode_ordinary
        system = ([self.start, *e("system\n" + self.system), self.end, *e("\n")]
                  if self.system is not None else [])
        return system + [self.start, *e("user\n")]

    def encode(self, user):
        """chat.text(user) as token ids: what a tokenizer makes of it with the markers special (the
        text between markers encoded whole, as transformers does); the user's text stays text even
        where it looks like a marker."""
        e, head = self.enc.encode_ordinary, self.head()
        body = e("user\n" + user)  # encoded with the role: the two may share a pre-token
        return (head[:len(head) - len(e("user\n"))] + body
                + [self.end, *e("\n"), self.start, *e("assistant\n")])

    def cut(self, ids, room):
        """ids of encode() cut to `room` tokens from the left of the user's text: the system
        message and the assistant's cue are kept, and the end of the user's text."""
        head = self.head()
        keep = len(head) if ids[:len(head)] == head else len(head) - len(self.enc.encode_ordinary(
            "user\n"))
        tail = 2 + len(self.enc.encode_ordinary("\n")) + len(self.enc.encode_ordinary("assistant\n"))
        if room < keep + tail + 1:
            raise ValueError(f"the chat template's {keep + tail} tokens leave no room for the text "
                             f"in {room} positions: shorten the text or the answer, or raise "
                             f"--block-size")
        return ids[:keep] + ids[len(ids) - (room - keep):]
