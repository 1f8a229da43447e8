"""Writes what a benchmark printed into its section of ``benchmarks/RESULTS.md``.

Every benchmark takes ``--record [PATH]``. The run then also replaces the text between
``<!-- begin NAME -->`` and ``<!-- end NAME -->`` in ``PATH`` (``benchmarks/RESULTS.md``
by default) with the command, the commit, the machine, its load when the run started,
and everything the run printed. So the measured tables in ``RESULTS.md`` come from the
scripts, never from an editor; the text around the markers says what they show.
"""

import argparse
import contextlib
import datetime
import io
import os
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")

_target = []


class _Record(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        _target[:] = [values]
        setattr(namespace, self.dest, values)


def add_option(parser):
    """Add ``--record [PATH]`` to a benchmark's argument parser."""
    parser.add_argument("--record", nargs="?", const=RESULTS, default=None, action=_Record, metavar="PATH",
                        help="also write the command, commit, machine and output into this benchmark's section "
                             "of RESULTS.md (default path: benchmarks/RESULTS.md)")


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def unrecorded():
    """A context in which printed text goes to stderr: for training logs and libraries'
    messages, which are not part of a benchmark's results."""
    return contextlib.redirect_stdout(sys.stderr)


def run(main, name):
    """Run a benchmark's ``main()`` and, when ``--record`` was given, record its output
    in section ``name``."""
    argv = sys.argv[1:]
    _target.clear()
    description = None
    if any(arg == "--record" or arg.startswith("--record=") for arg in argv):
        # The commit and the load are read before the run, which can take hours.
        command = " ".join(["python", os.path.relpath(sys.argv[0])] + _without_record(argv))
        description = describe_run(command, os.getloadavg()[0])
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        main()
    finally:
        sys.stdout = tee.stream
    if _target:
        write_section(_target[0], name, description + "\n\n```\n" + tee.copy.getvalue().rstrip() + "\n```")
        print(f"recorded in {_target[0]} (section {name})")


def _without_record(argv):
    """``argv`` without ``--record`` and its optional path."""
    kept, after_record = [], False
    for arg in argv:
        if after_record and not arg.startswith("-"):
            after_record = False
            continue
        after_record = arg == "--record"
        if not after_record and not arg.startswith("--record="):
            kept.append(arg)
    return kept


def describe_run(command, load):
    """One paragraph: the command, the commit, the machine and its load."""
    from timing import machine

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    info = machine()
    gpus = ", ".join(info["gpu"]) if info["gpu"] else "no GPU"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"`{command}` at commit {commit}, {when}; {info['cpu_cores']} CPU cores, {gpus}, TensorFlow "
            f"{info['tensorflow']}, Keras {info['keras']}; load average {load:.2f} when it started.")


def write_section(path, name, text):
    """Replace what lies between section ``name``'s markers in ``path`` with ``text``."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    with open(path) as f:
        content = f.read()
    if content.count(begin) != 1 or content.count(end) != 1 or content.index(begin) > content.index(end):
        raise ValueError(f"{path} needs exactly one '{begin}' followed by one '{end}' to record into.")
    head, rest = content.split(begin)
    _, tail = rest.split(end)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")
