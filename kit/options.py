"""
Options: each one is a field of a dataclass that belongs to the code that uses it. A method declares
its own next to its attach() (prompt_tuning.Config, ...), the loop its own (loop.TrainConfig), the
task and the base theirs (data.TaskOptions, bases.BaseOptions). A field says its default, its help
and its limits:

    @dataclass
    class Config(Options):
        prompt_len: int = option(20, "soft prompt vectors", least=1)  # --prompt-len

From those fields come the command line (cli.py, `python train.py --help`) and the checks: a value
is checked when its dataclass is made, so a bad option is one line before any work starts, from the
command line or from Python. cli.py refuses the options a run would not use: every option is used as
given or refused, never ignored.

    args = cli.parse(argv, train.METHODS)            # argparse.Namespace, checked
    cfg = options.build(prompt_tuning.Config, args)  # one group of it, as its dataclass
"""
import argparse
import math
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch


def option(default, help, least=None, above=None, most=None, choices=None, cli=True):
    """A dataclass field that is an option: its default, its help for --help, its limits
    (least <= value, above < value, value <= most, value in choices). cli=False keeps it off the
    command line."""
    return field(default=default, metadata=dict(help=help, least=least, above=above, most=most,
                                                choices=choices, cli=cli))


def flag(name):
    return "--" + name.replace("_", "-")


@dataclass
class Options:
    """The base of every group of options: each field is checked against its type and limits when
    made. A method's Config also says `where` its parameters go, its default `lr` and the context
    `positions` it takes: a class attribute where the value is fixed, a property where it depends on
    the options (prompt tuning's positions, the prefix's lr)."""
    # context positions a method puts in front of the tokens (prompt tuning: its vectors)
    positions = 0

    def __post_init__(self):
        for f in fields(self):
            if isinstance(getattr(self, f.name), os.PathLike):  # a pathlib.Path: its path string
                setattr(self, f.name, os.fspath(getattr(self, f.name)))
            check(f, getattr(self, f.name))

    def unused(self):
        """The options that these values leave unused (a given one is refused): none by default."""
        return set()


def check(f, value):
    m, name = f.metadata, flag(f.name)
    # not given: the code that uses it picks, as its help says
    if value is None and f.default is None:
        return
    kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    kind = f.type if f.type in kinds else None
    ok = kind is None or (isinstance(value, kind)
                          and not (kind is not bool and isinstance(value, bool)))
    if kind is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    if not ok:
        raise ValueError(f"{name} must be {kinds[kind]}{' (finite)' if kind is float else ''}, "
                         f"got {value!r}")
    if kind is str and not value.strip():
        raise ValueError(f"{name} is empty: give a value or leave the option out")
    if m.get("choices") and value not in m["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(map(str, m['choices']))}; "
                         f"got {value!r}")
    if m.get("least") is not None and value < m["least"]:
        raise ValueError(f"{name} must be at least {m['least']}, got {value}")
    if m.get("above") is not None and not value > m["above"]:
        raise ValueError(f"{name} must be greater than {m['above']}, got {value}")
    if m.get("most") is not None and value > m["most"]:
        raise ValueError(f"{name} must be at most {m['most']}, got {value}")


def cli_fields(cls):
    return [f for f in fields(cls) if f.metadata.get("cli")]


def build(cls, args, **override):
    """The dataclass `cls` from the command line's values (and overrides), checked."""
    return cls(**{**{f.name: getattr(args, f.name) for f in cli_fields(cls)}, **override})


# --------------------------------------------------------------------------------------------------
# The command line, made from the groups' fields

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    # "(default: X)" only where there is a plain default to show
    def _get_help_string(self, action):
        return (action.help if action.default in (None, True, False)
                else super()._get_help_string(action))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal, instead of argparse's usage block
        self.exit(2, f"error: {message} (--help lists every option)\n")


def parser(groups, choices, description="", default="prompt"):
    """argparse from [(title, dataclass)]: --method and the run-wide options, then each group's
    fields. Two groups may not use one name: a new method picks names of its own (LoRA's alpha:
    --lora-alpha)."""
    p = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--method", default=default, choices=choices, help="what to run")
    p.add_argument("--load", default=None,
                   help="evaluate a saved ckpt.pt again (on its own base and task)")
    p.add_argument("--device", default="auto",
                   help="auto picks cuda > mps > cpu; or cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16: autocast matmuls (weights stay float32); auto: bfloat16 on "
                        "CUDA, else float32")
    p.add_argument("--out-dir", default="out", help="cached bases, tokenizers and runs")
    seen = {"method", "load", "device", "dtype", "out_dir"}
    for title, cls in groups:
        g = p.add_argument_group(title)
        for f in cli_fields(cls):
            if f.name in seen:
                raise ValueError(f"two groups of options both define {flag(f.name)} "
                                 f"({title} is the second): "
                                 f"give the new one another name")
            seen.add(f.name)
            m = f.metadata
            if f.type is bool and f.default:  # on by default: the flag turns it off
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                               action="store_false", help=m["help"])
            elif f.type is bool:
                g.add_argument(flag(f.name), action="store_true", help=m["help"])
            # choices are checked by the group's dataclass, with one line like every other check
            else:
                shown = "{" + ",".join(map(str, m["choices"])) + "}" if m["choices"] else None
                g.add_argument(flag(f.name), type=f.type, default=f.default, metavar=shown,
                               help=m["help"])
    return p


def given(p, argv):
    """The names of the options given on the command line (even when given at their default
    value); one given twice is refused (argparse would keep the last one silently)."""
    seen = [(a.dest, o) for a in p._actions for o in a.option_strings for arg in argv
            if arg == o or arg.startswith(o + "=")]
    dests = [dest for dest, _ in seen]
    for dest, o in seen:
        if dests.count(dest) > 1:
            raise ValueError(f"{o} is given {dests.count(dest)} times: give it once")
    return set(dests)


def refuse(given, names, why):
    """One line for the first given option among `names`, which this run does not use."""
    extra = sorted(given & set(names))
    if extra:
        raise ValueError(f"{', '.join(flag(n) for n in extra)}: {why}")


# --------------------------------------------------------------------------------------------------
# Devices, dtypes and folders

def pick_device(name):
    if name == "auto":
        return ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N "
                         f"or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise ValueError(f"--device {name}: this code runs on cpu, cuda or mps devices")
    if not available[device.type]:
        raise ValueError(f"--device {name}: this torch has no {device.type} device; "
                         f"leave out --device to pick one")
    if device.type != "cuda" and device.index not in (None, 0):
        raise ValueError(f"--device {name}: there is one {device.type} device: give "
                         f"--device {device.type}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return name


def pick_dtype(dtype, device):
    return ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype


def autocast(device, dtype):
    """bf16 autocast on any device when dtype is "bfloat16" (matmuls in bf16, weights stay
    float32)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16"
            else nullcontext())


def writable_folder(path):
    """The output folder as an absolute path (so checkpoints find their bases from anywhere),
    created, tried."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out-dir {path} is a file, not a folder")
    try:
        # realpath: a link to a folder is that folder
        os.makedirs(os.path.realpath(path), exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {path} cannot be written ({e.strerror}): "
                         f"choose another folder") from None
    return path

