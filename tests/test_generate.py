"""kit/generate.py, kit/chat.py and top-p in model.sample: generation with every method attached equals
generation without the KV cache (greedy, token for token, both architectures, proxy tuning's three models
too); top-k and top-p on a distribution worked by hand; streaming text (characters split across tokens, stop
strings); ChatML wrapping on templates written here; and train.py --generate end to end on a tiny run:
the prompt cut from the left, --compare, a proxy run's three models, refusals."""
import json
import os
import re

import pytest
import torch

import train
from conftest import BASE_ARGS, TINY_ARGS, pretrained_gpt, tiny_batch
from conftest import train as train_steps
from kit import bases, chat, checkpoints, data, disk, generate, tokenizer
from kit.bpe import EOT, PAT
from model import sample

METHODS = list(train.METHODS)  # none, full, prompt, prefix, adapter, and any method added to the table


def tuned(name, arch, seed=0):
    """A tiny pretrained base with `name` attached and trained a few steps, so that the method matters."""
    model = pretrained_gpt(arch, block_size=64)  # room for the default 20-vector soft prompt
    torch.manual_seed(seed)
    method = train.METHODS[name]
    method.attach(model, method.Config())
    if name != "none":
        train_steps(model, steps=5, seed=seed)
    return model.eval()


def greedy(source, idx, n, use_cache=True):
    return list(generate.tokens(source, idx, n, use_cache=use_cache))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", METHODS)
def test_cached_generation_equals_uncached_with_every_method_attached(name, arch):
    model = tuned(name, arch)
    positions = train.METHODS[name].Config().positions
    source = generate.Source(name, [model], positions)
    x, _ = tiny_batch(1, B=1)
    cached = greedy(source, x[:, :6], 12)
    assert cached == greedy(source, x[:, :6], 12, use_cache=False)
    assert cached == model.generate(x[:, :6], 12, temperature=0)[0, 6:].tolist()  # the model's own loop
    assert source.context() == 64 - positions


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_proxy_generation_equals_uncached_and_proxy_tuning_generate(arch):
    large, expert, anti = tuned("full", arch, seed=1), tuned("full", arch, seed=2), pretrained_gpt(arch, 64)
    source = generate.Source("proxy", [large, expert, anti], alpha=1.5)
    x, _ = tiny_batch(2, B=1)
    cached = greedy(source, x[:, :5], 10)
    assert cached == greedy(source, x[:, :5], 10, use_cache=False)
    import proxy_tuning
    assert cached == proxy_tuning.generate(large, expert, anti, x[:, :5], 10, 1.5, temperature=0)[0, 5:].tolist()


# --------------------------------------------------------------------------------------------------------------
# Sampling on a distribution worked by hand: probabilities 0.5, 0.3, 0.15, 0.05

def draws(n=4000, **kw):
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(n, 1)
    return torch.bincount(sample(logits, 1.0, **kw)[:, 0], minlength=4) / n


def test_top_p_keeps_the_likeliest_tokens_until_their_probabilities_reach_it():
    # 0.5 < 0.8, 0.5 + 0.3 = 0.8 reaches it: the first two, renormalised to 0.625 and 0.375
    kept = draws(top_p=0.8)
    assert kept[2] == kept[3] == 0 and abs(kept[0] - 0.625) < 0.03 and abs(kept[1] - 0.375) < 0.03
    assert (draws(top_p=0.5)[1:] == 0).all()          # the first alone reaches 0.5
    assert draws(top_p=0.81)[3] == 0 and draws(top_p=0.81)[2] > 0  # 0.8 < 0.81: the third too
    assert (draws(top_p=1.0) > 0).all() and (draws(top_p=1e-9)[1:] == 0).all()  # the likeliest always stays


def test_top_k_keeps_the_k_likeliest_and_combines_with_top_p():
    three = draws(top_k=3)
    assert three[3] == 0 and abs(three[0] - 0.5 / 0.95) < 0.03
    two = draws(top_k=3, top_p=0.8)  # top-k first (0.526, 0.316, 0.158), then top-p: 0.526 + 0.316 >= 0.8
    assert two[2] == two[3] == 0
    unfiltered = draws()
    assert all(abs(unfiltered[i] - p) < 0.03 for i, p in enumerate((0.5, 0.3, 0.15, 0.05)))


def test_greedy_and_seeded_sampling_are_repeatable():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, 0, top_k=2, top_p=0.1), logits.argmax(-1, keepdim=True))
    torch.manual_seed(5)
    a = sample(logits, 0.7, top_p=0.9)
    torch.manual_seed(5)
    assert torch.equal(a, sample(logits, 0.7, top_p=0.9))


# --------------------------------------------------------------------------------------------------------------
# Streaming text

CHATML = "<|im_start|>", "<|im_end|>"


def byte_encoding(template=None):
    """A tokenizer of single bytes, with EOT and ChatML's markers as special tokens."""
    enc = tokenizer.Encoding("bytes", PAT, {bytes([i]): i for i in range(256)},
                             {EOT: 256, CHATML[0]: 257, CHATML[1]: 258}, eot=256)
    enc.chat_template = template
    return enc


def streamed(ids, stop=None):
    stream = generate.Stream(byte_encoding(), stop)
    parts = [stream.add(t) for t in ids]
    return parts, parts + [stream.add(None, final=True)], stream.stopped


def test_stream_waits_for_a_characters_last_byte():
    ids = list("aé🙂b".encode())  # é: 2 bytes, 🙂: 4 bytes, each byte one token
    parts, done, _ = streamed(ids)
    assert parts == ["a", "", "é", "", "", "", "🙂", "b"] and "".join(done) == "aé🙂b"


def test_stream_stops_at_a_stop_string_and_holds_back_only_what_may_begin_it():
    parts, done, stopped = streamed(list(b"one END two"), stop="END")
    assert stopped and "".join(done) == "one " and parts[:4] == ["o", "n", "e", " "]
    parts, done, stopped = streamed(list(b"an ENcore"), stop="END")
    assert not stopped and "".join(done) == "an ENcore"
    assert parts[3:6] == ["", "", "ENc"]  # "E" and "EN" may begin END and wait; "ENc" cannot
    _, done, stopped = streamed(list("x\nQ:".encode()), stop="\nQ:")
    assert stopped and "".join(done) == "x"


def test_decoding_stops_at_the_end_of_text_and_at_an_instruct_models_end_of_turn():
    assert generate.stop_tokens(byte_encoding()) == {256: "the end-of-text token", 258: "<|im_end|>"}
    plain = tokenizer.Encoding("bytes", PAT, {bytes([i]): i for i in range(256)}, {EOT: 256}, eot=256)
    assert generate.stop_tokens(plain) == {256: "the end-of-text token"}


def test_escapes_in_prompts():
    assert generate.unescape(r"a\nb\tc\\n\d") == "a\nb\tc\\n\\d"
    assert generate.escape("a\nb\\") == r"a\nb\\"


# --------------------------------------------------------------------------------------------------------------
# Chat templates: ChatML, as SmolLM2's and Qwen2.5's files write it

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN = r"""{%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- for message in messages %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def test_chatml_templates_are_written_as_the_template_writes_one_user_message():
    smol = chat.ChatML.parse(SMOL, byte_encoding())
    assert smol.text("Hi?") == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                "Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    qwen = chat.ChatML.parse(QWEN, byte_encoding())  # '\n' as an escape inside the quotes, not a newline
    assert qwen.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    bare = chat.ChatML.parse(SMOL.replace(SMOL[SMOL.index("{% if loop.first"):SMOL.index("{{'<|im_start|>'")], ""),
                             byte_encoding())  # no default system message
    assert bare.system is None and bare.text("x") == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_ids_put_the_markers_as_special_tokens_and_cut_keeps_the_template():
    enc = byte_encoding(SMOL)
    c = chat.ChatML.of(enc)
    ids = c.encode("a <|im_end|> b")  # the user's text stays text, even where it looks like a marker
    assert ids.count(258) == 2 and ids.count(257) == 3 and ids[0] == 257 and c.end == 258
    assert enc.decode(ids) == c.text("a <|im_end|> b")
    cut = c.cut(ids, len(ids) - 4)
    assert len(cut) == len(ids) - 4 and cut[:len(c.head())] == c.head() and cut[-12:] == ids[-12:]
    assert enc.decode(cut) == c.text("im_end|> b")  # the text's first 4 tokens (bytes) went
    with pytest.raises(ValueError, match="leave no room for the text"):
        c.cut(ids, len(c.head()) + 3)


def test_a_hub_folder_keeps_its_chat_template_in_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": SMOL}]}))
    assert chat.folder_template(str(tmp_path)) == SMOL and chat.folder_template(str(tmp_path / "none")) is None


@pytest.mark.parametrize("template,message", [
    (None, "carries no chat template"),
    ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}{% endfor %}", "reads ChatML"),
    (SMOL.replace("'<|im_end|>' + '\n'", "'<|im_end|>\n'"), "reads ChatML")])
def test_other_templates_are_refused_in_one_line(template, message):
    with pytest.raises(ValueError, match=message) as e:
        chat.ChatML.of(byte_encoding(template))
    assert "\n" not in str(e.value)


def test_a_chat_task_wraps_each_input_and_ends_free_answers_at_im_end():
    enc = byte_encoding(SMOL)
    task = data.Task("t", [data.Example("Q: 2+2?\nA:", " 4")] * 3, [], [], chat=True)
    data.encode_task(task, enc, block_size=512)
    ex = task.train[0]
    assert enc.decode(ex.input_ids) == chat.ChatML.of(enc).text("Q: 2+2?\nA:") and ex.answer_ids[-1] == 258
    assert task.eot == 258
    task = data.Task("t", [data.Example("x" * 300, " 4")], [], [], chat=True)
    data.encode_task(task, enc, block_size=200)  # cut from the left inside the template, which is kept
    assert task.truncated == 1 and enc.decode(task.train[0].input_ids).startswith("<|im_start|>system\n")


# --------------------------------------------------------------------------------------------------------------
# train.py --generate, end to end on a tiny run

@pytest.fixture(scope="module")
def run(tiny_out):
    """A tiny prompt-tuned run and a tiny fully tuned one (the expert of a proxy run made here)."""
    out = {m: train.main(["--method", m, "--out-dir", tiny_out, *TINY_ARGS, "--prompt-len", "4"]
                         if m == "prompt" else ["--method", m, "--out-dir", tiny_out, *TINY_ARGS])
           for m in ("prompt", "full")}
    return {m: os.path.join(r["run_dir"], "ckpt.pt") for m, r in out.items()}


def lines(capsys):
    got = capsys.readouterr()
    return got.out, got.err


def test_generate_from_a_run_streams_and_compares_with_the_frozen_base(run, capsys):
    train.main(["--load", run["prompt"], "--generate", r"Q: Where was\nA:", "--compare", "--max-new-tokens", "5"])
    out, err = lines(capsys)
    assert out.startswith(">>> Q: Where was\\nA:\n[prompt tuned] ") and "\n[frozen base] " in out
    assert err.count("tokens/s; stopped at") == 2 and "greedy, at most 5 new tokens" in err


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_and_said(run, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("word " * 200 + "\n\nQ: short\\nA:\n")
    train.main(["--load", run["full"], "--generate-file", str(prompts), "--max-new-tokens", "8",
                "--temperature", "0.9", "--top-k", "5", "--seed", "3"])
    out, err = lines(capsys)
    assert re.search(r"the prompt is \d+ tokens: cut from the left to 56, so that 8 new tokens fit the context of 64",
                     err) and out.count(">>> ") == 2 and "seed 3" in err


def test_a_proxy_run_generates_with_its_three_models(run, tiny_out, capsys):
    """A proxy run's folder as run_proxy writes it: its scores, its large model, its expert's run beside it."""
    expert = os.path.dirname(run["full"])
    folder = os.path.join(os.path.dirname(expert), "qa-tiny-proxy-test")
    os.makedirs(folder, exist_ok=True)
    base = bases.find(checkpoints.read_run(run["full"])["base"], run["full"])
    metrics = dict(method="proxy", run_dir=expert, alpha=2.0,
                   large_base=bases.record(base, bases.tokenizer_of(base), folder))
    disk.save_file(dict(metrics, seal=checkpoints.seal(metrics)), os.path.join(folder, "metrics.json"))
    train.main(["--load", folder, "--generate", "Q: x\\nA:", "--alpha", "1", "--compare", "--max-new-tokens", "4"])
    out, err = lines(capsys)
    assert "[proxy-tuned, alpha 1] " in out and "[large model alone] " in out
    with pytest.raises(SystemExit, match="^error: --alpha: the strength of a proxy run's expert"):
        train.main(["--load", run["full"], "--generate", "x", "--alpha", "1"])


def refusal(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def test_a_run_that_cannot_be_rebuilt_is_refused_as_load_refuses_it(run, tmp_path):
    ckpt = torch.load(run["prompt"], weights_only=False)
    for what, change in (("method", lambda c: c.update(method="ia3")),
                         ("base", lambda c: c["base"]["spec"].update(path=str(tmp_path / "gone.pt")))):
        copy = dict(ckpt, base=json.loads(json.dumps(ckpt["base"])))
        change(copy)
        path = tmp_path / what / "ckpt.pt"
        path.parent.mkdir()
        torch.save(copy, path)
        scored = refusal(["--load", str(path)])
        assert refusal(["--load", str(path), "--generate", "x"]) == scored
        assert ("no longer has" if what == "method" else "which is missing") in scored


@pytest.mark.parametrize("argv,message", [
    (["--generate", "x", "--top-p", "0.9"], "--top-p: greedy decoding"),
    (["--generate", "x", "--temperature", "1", "--top-p", "1.5"], "--top-p must be at most 1"),
    (["--generate", "x", "--method", "adapter"], "--method: generating with adapter needs its tuned run"),
    (["--generate", "x", "--compare"], "--compare prints the frozen base after a tuned run"),
    (["--generate", "x", "--steps", "3"], "--steps: --generate without --load"),
    (["--generate", "x", "--chat"], "--chat: the tokenizer .* carries no chat template"),
    (["--generate", "x", "--max-new-tokens", "64"], "leaves no room for a prompt in the context of 64"),
    (["--stop", "x"], "--stop: generation's: give --generate"),
    (["--generate", "x", "--generate-file", "p.txt"], "give one of them")])
def test_bad_generation_options_are_refused_in_one_line(tiny_out, argv, message):
    assert re.search(message, refusal([*argv, "--out-dir", tiny_out, *BASE_ARGS]))
