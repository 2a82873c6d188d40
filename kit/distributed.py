"""
Past one process: `torchrun` starts N copies of train.py (or compare.py) and PyTorch's
DistributedDataParallel (DDP) keeps them one training run, as nanoGPT's train.py does. Each process
takes its own rows of every batch (the global batch stays --batch-size); after backward, DDP
all-reduces the gradients of the parameters that require grad, and no others, so a method's frozen
base is never sent: a 20-vector soft prompt on the shipped base moves 2,560 floats per step. Rank 0
alone logs, evaluates and writes (checkpoints, metrics, bases, tokenizers); the others wait for it.

    torchrun --standalone --nproc_per_node 2 train.py --method prompt   # gloo on CPUs, nccl on GPUs

With one process (no torchrun) train.py never enters session(), the loop asks
`dist.is_initialized()` before it wraps, shards or sums, and what does run here (on_main, is_main)
is the plain call:

    with distributed.session(cmd, disk.writer(cmd.out_dir)) as cmd:  # the lock: rank 0's
        ddp = distributed.wrap(module, cmd.device)   # DDP over the parameters that require grad
        idx, targets = distributed.shard(idx, targets)   # this process's rows of the global batch
        value = distributed.on_main(fn, *args)       # fn on rank 0; every rank gets what it returns

A process that dies ends the run: its peers' next collective fails (gloo: the socket closes) and
torchrun stops the others, within seconds (1.2 s here), each with a line and nothing half-written
(every file is written aside, then renamed). A process that is alive but stuck ends the others
after TIMEOUT, the longest any process waits at a collective; rank 0's evaluation, which the others
wait for at the end of a run, must fit in it.
"""
import dataclasses
import datetime
import os
import signal
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

TIMEOUT = datetime.timedelta(minutes=30)  # torch's own default for gloo

# what --help says (train.py's and compare.py's)
USAGE = """
Several processes: torchrun --standalone --nproc_per_node N train.py ... (or compare.py) trains
with DistributedDataParallel: gloo on CPUs, nccl on GPUs (one per process). --batch-size stays the
global batch, split between the processes (and into --grad-accum micro-batches); only the trained
parameters' gradients are all-reduced; rank 0 alone logs, evaluates and writes. Proxy tuning: its
expert trains on every process, the decoding runs on rank 0."""


def launched():
    """The number of processes torchrun started (its WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", 1))


def active():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if active() else 1


def rank():
    """This process's rank: the process group's, or before it is set up, torchrun's RANK."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", 0))


def is_main():
    return rank() == 0


# --------------------------------------------------------------------------------------------------
# The process group

def setup(device):
    """Join torchrun's process group (with one process: nothing) and return this process's device:
    the CPU (gloo), or under nccl the GPU of its local rank."""
    if launched() == 1 or active():
        return device
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: torchrun trains on cpu (gloo) or cuda (nccl); on "
                         f"{kind}, train in one process: python train.py")
    if kind == "cuda":
        here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", launched())), torch.cuda.device_count()
        if here > gpus:
            raise ValueError(f"torchrun started {here} processes on this machine, which has {gpus} "
                             f"CUDA device{'s' if gpus != 1 else ''}: give --nproc_per_node "
                             f"{gpus} at most (or --device cpu)")
        if ":" in device:
            raise ValueError(f"--device {device}: under torchrun each process takes the GPU of "
                             f"its local rank; give --device cuda or leave --device out")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def teardown():
    if active():
        dist.destroy_process_group()


@contextmanager
def session(cmd, lock):
    """A command under torchrun: the process group, and cmd with this process's device. `lock`
    (the --out-dir's writer lock) is taken by rank 0 alone; a refusal is every rank's ValueError,
    so no process waits for one that has left. A peer lost mid-run is one line, too."""
    cmd = dataclasses.replace(cmd, device=setup(cmd.device))
    before = signal.signal(signal.SIGTERM, stopped) if active() else None
    try:
        with ExitStack() as stack:
            on_main(stack.enter_context, lock)
            yield cmd
    except RuntimeError as e:  # a peer died (gloo: its socket closed) or stopped answering
        if not lost(e):
            raise
        why = str(e).splitlines()[0].split("] ")[-1].split(". ")[0][:100]  # gloo's: no source path
        raise ValueError(f"rank {rank()}: another process of this torchrun ended or stopped "
                         f"answering ({why}); nothing half-written was kept") from None
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
        teardown()


def lost(error):
    """Whether a RuntimeError says that the process group lost a peer, not a bug of ours."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        clue in text for clue in ("Connection reset by peer", "Connection closed by peer",
                                  "timed out", "Timed out", "NCCL communicator was aborted"))


def stopped(signum, frame):
    """torchrun stops the others when a process fails: finish like Ctrl-C (files aside removed)."""
    raise SystemExit(f"error: rank {rank()}: stopped by torchrun (another process ended); nothing "
                     f"half-written was kept" if is_main() else 1)


# --------------------------------------------------------------------------------------------------
# What the loop calls: each is the plain thing with one process

def wrap(module, device, find_unused=False):
    """DDP over `module`, counting the floats it all-reduces (ddp.reduced.floats): only the
    parameters that require grad have gradients to reduce. The trained parameters start as rank 0's
    (DDP's own start-up copy would send the frozen weights too, which every process read from one
    file). find_unused: a parameter may get no gradient (an untied LM head beside a classification
    layer)."""
    if not active():
        return module
    trained = [p for p in module.parameters() if p.requires_grad]
    for p in trained:
        dist.broadcast(p.data, 0)
    gpu = [device] if device.startswith("cuda") else None
    ddp = DistributedDataParallel(module, device_ids=gpu, init_sync=False,
                                  forward_sync_buffers=False, find_unused_parameters=find_unused)
    ddp.reduced = SimpleNamespace(floats=0)
    ddp.register_comm_hook(ddp.reduced, counted)
    return ddp


def counted(state, bucket):
    """DDP's default all-reduce of a bucket of gradients (their mean), counting the floats sent."""
    state.floats += bucket.buffer().numel()
    return allreduce_hook(None, bucket)


def shard(*tensors):
    """This process's rows of a global batch: the rank-th of world_size equal slices."""
    if not active():
        return tensors
    n = tensors[0].size(0) // world_size()
    return tuple(t[rank() * n:(rank() + 1) * n] for t in tensors)


def total(x):
    """The sum over the processes of a tensor (one process: itself)."""
    if active():
        dist.all_reduce(x)
    return x


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone (an evaluation, a write); every rank returns its result,
    or raises its ValueError, so the processes stay in step and read what it wrote."""
    if not active():
        return fn(*args, **kwargs)
    out = [None]
    if is_main():
        try:
            out = [(fn(*args, **kwargs), None)]
        except ValueError as e:
            out = [(None, e)]
    dist.broadcast_object_list(out, src=0)
    result, error = out[0]
    if error is not None:
        raise error
    return result


def share(value):
    """Rank 0's value, on every rank (it waits for rank 0 to get there)."""
    return on_main(lambda: value)
