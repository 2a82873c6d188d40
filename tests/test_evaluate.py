"""evaluate.py: the forgetting metric is the language-modelling loss on held-out text, measured with the method
attached; exact match stops at EOT and respects the context; logits at the last position are the full ones."""
import torch
import torch.nn.functional as F

import prompt_tuning
from kit import data, evaluate
from conftest import pretrained_gpt, tiny_batch


def test_text_loss_is_the_mean_cross_entropy_over_every_token_after_the_first():
    model = pretrained_gpt()
    x, _ = tiny_batch(T=10)
    rows = [(seq[:1].tolist(), seq[1:].tolist()) for seq in x] + [([5], [6, 7, 8])]  # rows of other lengths
    loss = evaluate.text_loss(lambda idx: model(idx)[0], rows, "cpu", pad=0, batch=3)
    manual = [F.cross_entropy(model(torch.tensor([p + c[:-1]]))[0][0], torch.tensor(c), reduction="sum").item()
              for p, c in rows]
    assert abs(loss - sum(manual) / sum(len(c) for _, c in rows)) < 1e-5


def test_forgetting_is_measured_with_the_method_attached():
    model = pretrained_gpt()
    x, _ = tiny_batch(T=10)
    rows = [(seq[:1].tolist(), seq[1:].tolist()) for seq in x]
    before = evaluate.text_loss(lambda idx: model(idx)[0], rows, "cpu", pad=0)
    prompt_tuning.attach(model, prompt_tuning.Config(prompt_len=4, prompt_init="random"))
    after = evaluate.text_loss(lambda idx: model(idx)[0], rows, "cpu", pad=0)
    assert after != before  # the soft prompt is in front of the held-out text too
    model.soft_prompt = None
    assert evaluate.text_loss(lambda idx: model(idx)[0], rows, "cpu", pad=0) == before  # detached: nothing lost


def test_logits_at_the_last_position_equal_the_full_logits_there():
    model = pretrained_gpt()
    x, _ = tiny_batch(T=10)
    last = torch.tensor([3, 9, 0, 5])
    assert torch.equal(evaluate.logits_at(model, x, last), model(x)[0][torch.arange(4), last])


def test_exact_match_stops_at_eot_and_within_the_context():
    model = pretrained_gpt()
    exs = [data.Example("a", "b", input_ids=[1, 2, 3], answer_ids=[4, 5, 63]),
           data.Example("c", "d", input_ids=[7] * 30, answer_ids=[8, 63])]  # 30 of the 32 positions
    task = data.Task("toy", [], [], exs, eot=63, decode=lambda ids: " ".join(map(str, ids)))
    greedy = lambda idx, n: model.generate(idx, n, temperature=0, stop=63)
    score, preds = evaluate.exact_match(greedy, task, exs, "cpu", context=32)
    assert 0 <= score <= 1 and len(preds) == 2
    assert len(preds[1].split()) <= 2  # only the room left in the context was generated


def test_forced_match_is_greedy_decoding_scored_without_decoding():
    # a bigram "model" whose greedy path is known: 0 1 2 3 EOT, and 4 5 6 7 8 4 ... never stopping
    nxt = torch.tensor([1, 2, 3, 9, 5, 6, 7, 8, 4, 9])
    eot = 9
    logits_fn = lambda idx, pos: 5.0 * torch.nn.functional.one_hot(nxt[idx.gather(1, pos)], 10).float()

    def greedy(idx, n):
        for _ in range(n):
            idx = torch.cat((idx, nxt[idx[:, -1:]]), 1)
        return idx
    exs = [data.Example(f"in{i}", " ".join(map(str, a[:-1])), input_ids=p, answer_ids=a)
           for i, (p, a) in enumerate([([0], [1, 2, 3, 9]),    # greedy writes it and stops: exact
                                       ([4], [5, 6, 9]),       # right tokens, but goes on: starts only
                                       ([1], [3, 9]),          # wrong from the first token
                                       ([7, 2], [3, 9]),       # exact
                                       ([4], [5, 6, 7])])]     # no EOT in answer_ids: forced adds it
    task = data.Task("toy", [], [], exs, eot=eot, decode=lambda ids: " ".join(map(str, ids)))
    exact, starts = evaluate.forced_match(logits_fn, task, exs, "cpu", batch=2)
    assert exact == [True, False, False, True, False] and starts == [True, True, False, True, True]
    _, preds = evaluate.exact_match(greedy, task, exs, "cpu", context=32)
    assert exact == [p.strip() == ex.answer.strip() for p, ex in zip(preds, exs)]  # what decoding scores
