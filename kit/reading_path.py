"""
The path a student walks: which of the project's files and functions run between train.py's main()
and the first optimizer step, counted by a tracer (sys.settrace), for the README's reading path.

    python -m kit.reading_path                          # python train.py --method prefix, shipped base
    python -m kit.reading_path --method adapter --list  # another command; every function by name

Counted: functions of the project's own .py files (tests aside) entered at least once; comprehensions
and generator expressions are parts of the function they sit in, not functions of their own. The run
stops at the first optimizer.step(), so nothing is trained or written but what comes before it.
"""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


class FirstStep(Exception):
    pass


def walk(argv):
    """{file: set of function names} entered from train.main(argv) to the first optimizer step."""
    import train
    seen = {}

    def tracer(frame, event, arg):
        path = os.path.abspath(frame.f_code.co_filename)
        own = (path.startswith(ROOT + os.sep) and path.endswith(".py") and os.path.isfile(path)
               and os.sep + "tests" + os.sep not in path and path != os.path.abspath(__file__))
        if event == "call" and own:
            name = frame.f_code.co_qualname
            if not name.endswith(PARTS):
                seen.setdefault(os.path.relpath(path, ROOT), set()).add(name)
        return None

    def first_step(self, *a, **k):
        sys.settrace(None)
        raise FirstStep

    steps = torch.optim.Optimizer.step, torch.optim.AdamW.step  # AdamW defines its own step
    torch.optim.Optimizer.step = torch.optim.AdamW.step = first_step
    sys.settrace(tracer)
    try:
        train.main(argv)
    except FirstStep:
        pass
    finally:
        sys.settrace(None)
        torch.optim.Optimizer.step, torch.optim.AdamW.step = steps
    return seen


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    listing = "--list" in argv
    argv = [a for a in argv if a != "--list"] or ["--method", "prefix"]
    with tempfile.TemporaryDirectory() as out:
        seen = walk(argv + ["--out-dir", out])
    n = sum(len(f) for f in seen.values())
    print(f"python train.py {' '.join(argv)}: {len(seen)} of the project's files and {n} of its "
          f"functions between main() and the first optimizer step")
    for file in sorted(seen, key=lambda f: -len(seen[f])):
        print(f"  {file:28} {len(seen[file]):3}" + (f"  {', '.join(sorted(seen[file]))}" if listing else ""))


if __name__ == "__main__":
    main()
