"""Past one process, on a CPU: 2 processes (spawned here, gloo, 1 thread each) train the same tensors as one
process on the same global batch, for prompt tuning and adapters (a classification layer too), DDP sending only
the trained parameters' gradients; --grad-accum 2 x B equals one batch of 2B; under train.py rank 0 alone writes;
the bad inputs are one line each, and a process that dies ends the other instead of hanging it."""
import fcntl
import os
import random
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import adapter
import prompt_tuning
import train
from kit import data, disk, distributed, loop
from conftest import tiny, tiny_gpt

# float32: the same sums in another order (rows split, padding trimmed), then 4 AdamW steps at lr 0.03, whose
# m / sqrt(v) magnifies the rounding of gradients near zero (measured: 4e-7 across processes, 1.1e-5 accumulated)
TOL = 1e-4


def toy_task(n=64, seed=0):
    """Inputs of 2-11 tokens and answers of 1-3 tokens, so that equal rows hold unequal target counts."""
    rng = random.Random(seed)
    words = lambda least, most: [rng.randrange(1, 60) for _ in range(rng.randrange(least, most))]
    exs = [data.Example(f"p{i}", str(label), input_ids=words(2, 12), answer_ids=[label] + words(0, 3))
           for i, label in enumerate([7, 9] * (n // 2))]
    return data.Task("toy", exs[:48], exs[48:56], exs[56:], choices=["7", "9"], choice_ids=[[7], [9]], eot=63)


# prompt tuning in 2 micro-batches per process; adapters (their layer norms too) beside a classification layer
JOBS = [("prompt", dict(batch_size=8, grad_accum=2)), ("adapter", dict(batch_size=8, classifier=True))]


def tune(name, train_kw):
    """A few steps of a method on the toy task; returns the trained tensors, the metrics and what was logged."""
    method, method_cfg = dict(prompt=(prompt_tuning, prompt_tuning.Config(prompt_len=4)),
                              adapter=(adapter, adapter.Config(bottleneck=4)))[name]
    lines = []
    loop.print = lambda *a, **k: lines.append(" ".join(map(str, a)))  # what the loop logs (rank 0 alone)
    try:
        model = tiny_gpt(seed=1)
        cfg = loop.TrainConfig(steps=4, eval_every=2, lr=3e-2, **train_kw)
        _, clf, metrics = loop.finetune(model, toy_task(), method, method_cfg, cfg, "cpu", name)
    finally:
        del loop.print
    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"clf.{n}": p.detach().clone() for n, p in (clf.named_parameters() if clf else [])})
    return tensors, metrics, lines


def free_ports(n):
    """n ports that nothing listens on, all different: each is bound until all are found."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main(argv, rank, port):
    """train.main as one process of a torchrun (a process group of its own, on a port of its own); returns its
    result or exit code, the files rank 1 wrote, and the seconds it took."""
    os.environ["MASTER_PORT"] = str(port)
    writes, save = [], disk.save_file
    if rank:
        disk.save_file = lambda obj, path, *a, **k: writes.append(path) or save(obj, path, *a, **k)
    t0 = time.time()
    try:
        result = train.main(argv)
    except SystemExit as e:
        result = e.code
    finally:
        disk.save_file = save
    return result, writes, time.time() - t0


def worker(rank, world, ports, out, argv, lock):
    """One of `world` processes, as torchrun starts it (its environment): the toy runs, then train.py three
    times: a run, a run refused the --out-dir that another process holds, and a run that rank 1 leaves."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    results = dict(tune=[tune(*job) for job in JOBS])
    distributed.teardown()
    results["run"] = main(argv, rank, ports[1])
    with open(lock, "a+") as f:
        if rank == 0:  # as another train.py on the same --out-dir would
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        results["locked"] = main(argv, rank, ports[2])
    torch.save(results, f"{out}.{rank}")
    if rank:  # dies at its second step
        accumulate, steps = loop.accumulate, []
        loop.accumulate = lambda *a: (steps.append(1), len(steps) == 2 and os._exit(9), accumulate(*a))[2]
    results["died"] = main(tiny("--steps", "40", "--seed", "2", base=argv), rank, ports[3])
    torch.save(results, f"{out}.{rank}")


@pytest.fixture(scope="module")
def two(tiny_out, reviews, tmp_path_factory):
    """Each rank's results; the processes are never waited for past a limit."""
    argv = tiny("--out-dir", tiny_out, "--task", reviews, "--method", "adapter", "--steps", "3",
                "--grad-accum", "2")
    out = str(tmp_path_factory.mktemp("ranks") / "rank")
    ctx = mp.start_processes(worker, args=(2, free_ports(4), out, argv, os.path.join(tiny_out, ".lock")),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while any(p.is_alive() for p in ctx.processes) and time.time() < deadline:
        time.sleep(0.2)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "the processes did not end within 120 s"
    return [torch.load(f"{out}.{r}") for r in range(2)], [p.exitcode for p in ctx.processes]


def test_two_processes_train_the_same_tensors_as_one_and_send_only_the_trained_gradients(two):
    (first, second), _ = two
    for job, one, (tensors, metrics, lines) in zip(JOBS, [tune(*job) for job in JOBS], first["tune"]):
        assert one[0].keys() == tensors.keys() and tensors
        worst = max((one[0][n] - tensors[n]).abs().max().item() for n in tensors)
        assert worst < TOL, (job, worst)
        assert all(abs(a - b) < TOL for a, b in zip(one[1]["losses"], metrics["losses"]))
        assert (metrics["test"], metrics["val"], metrics["processes"]) == (one[1]["test"], one[1]["val"], 2)
        floats = sum(t.numel() for t in tensors.values())  # the trained parameters', the base's 8,128 never
        assert f"DDP all-reduced {floats:,} gradient floats in step 1" in "\n".join(lines), lines
    for (t0, m0, _), (t1, m1, lines) in zip(first["tune"], second["tune"]):  # the same on both, rank 0 logs
        assert all(torch.equal(t0[n], t1[n]) for n in t0) and m0["test"] == m1["test"] and not lines


def test_gradient_accumulation_of_2_x_b_is_one_batch_of_2b():
    one = tune("adapter", dict(batch_size=16))
    accumulated = tune("adapter", dict(batch_size=16, grad_accum=2))
    assert max((one[0][n] - accumulated[0][n]).abs().max().item() for n in one[0]) < TOL
    assert all(abs(a - b) < TOL for a, b in zip(one[1]["losses"], accumulated[1]["losses"]))
    assert one[1]["losses"] != tune("adapter", dict(batch_size=8))[1]["losses"]  # the batch matters


def test_under_train_py_rank_0_alone_writes_and_both_end_on_a_refusal_or_a_lost_process(two):
    (first, second), codes = two
    (m0, _, _), (m1, writes, _) = first["run"], second["run"]
    assert writes == [] and m1 == m0 and m0["processes"] == 2  # rank 1 got rank 0's metrics
    assert sorted(os.listdir(m0["run_dir"])) == ["ckpt.pt", "metrics.json"]
    assert first["locked"][0].startswith("error: another train.py or compare.py") and second["locked"][0] == 1
    assert codes[1] == 9 and first["died"][0].startswith("error: rank 0: another process of this torchrun "
                                                         "ended"), first["died"]
    assert first["died"][2] < 30


def test_bad_input_under_torchrun_is_one_line_before_any_work(monkeypatch, tiny_out):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"^error: --batch-size 5 does not split into 2 processes: "
                                         r"give a multiple of 2$"):
        train.main(tiny("--out-dir", tiny_out, "--batch-size", "5"))
    with pytest.raises(SystemExit, match=r"^error: --batch-size 6 does not split into 2 processes x --grad-accum 2 "
                                         r"\(4 equal parts\)"):
        train.main(tiny("--out-dir", tiny_out, "--batch-size", "6", "--grad-accum", "2"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="^torchrun started 2 processes on this machine, which has 1 CUDA device: "
                                         "give --nproc_per_node 1 at most"):
        distributed.setup("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match=r"^error: --batch-size 5 does not split into --grad-accum 2"):
        train.main(tiny("--out-dir", tiny_out, "--batch-size", "5", "--grad-accum", "2"))
