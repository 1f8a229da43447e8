"""DEQ fusion against the official PyTorch code at equal solver work: train-step and eval times.

    python benchmarks/perf_vs_peer.py --peer-code DIR [--peer-python PYTHON] [--batch 245] [--width 256]
        [--repeats 20] [--round-steps 5] [--threads N] [--json FILE] [--record]

``DIR`` holds the official code of Ni et al. ("Deep Equilibrium Multimodal Fusion",
arXiv 2306.16645, repository jinhong-ni/DEQFusion): ``DEQ_fusion.py``, ``solver.py`` and
``jacobian.py``, used unmodified. It is loaded at run time by a driver that this script
writes to a temporary file and runs with ``PYTHON`` (a Python with PyTorch; default
``$MMFUSION_PEER_PYTHON``) in a subprocess. The driver needs three runtime shims,
none of which edits the official files: ``torch.solve`` (removed from PyTorch) becomes
``torch.linalg.solve`` with its arguments swapped, ``Tensor.cuda()`` the identity and
``torch.cuda.synchronize`` a no-op (a CPU run).

What is measured, on both sides: batch 245, 3 modalities of width 256, random float32
inputs and 2-class labels from a fixed seed (the same numbers on both sides), the fused
output through a fixed (not trained) linear head of 2 classes, cross-entropy, plus 20
times the Jacobian penalty (the Hutchinson estimate of ``||J_f(z*)||_F^2 / dim`` with 2
probes), and an Adam step (lr 1e-4) on the fusion's parameters.

- peer: the official ``DEQFusion(256, 3)`` with ``f_thres=30``, ``b_thres=31``,
  ``stop_mode="abs"`` and Anderson (its ``m=6``); the solvers' ``eps`` (default 1e-3,
  which the official model does not pass) is set to 1e-30 on the instance's
  ``f_solver``/``b_solver``, so no solve stops early. Its Jacobian loss is the official
  ``jac_loss_estimate`` with its default of 2 probes (``featureFusion`` passes no count);
  the module returns it unweighted, and the step adds 20 times its mean to the loss.
- ours: ``keras_mmfusion.layers.DEQFusion`` with ``num_groups=4`` (the official
  GroupNorm's groups), Anderson with ``memory=6`` (the official ``m``), ``max_iter=30``,
  ``tol=1e-30``, ``stop_mode="abs"``, ``backward=ImplicitAdjoint(max_iter=31,
  tol=1e-30, stop_mode="abs")``, ``jacobian_weight=20``, ``jacobian_probes=2``. The
  training step is one ``tf.function`` (a ``GradientTape`` over the layer, the head and
  the loss with the layer's ``losses``, then ``keras.optimizers.Adam.apply_gradients``),
  in two modes: a graph (``jit_compile=False``) and XLA (``jit_compile=True``).

So every training step makes 30 evaluations of the update in the forward solve, one more
with a gradient at the solution (the penalty's two vector-Jacobian products and the
parameter gradients go through it) and 31 adjoint evaluations (vector-Jacobian products)
in the backward solve, on both sides; the script checks the counts after the timing
(ours: the layer's ``last_stats``; the peer: evaluations counted by the driver's wrappers
of the update and of the adjoint map, with the official solver's ``nstep`` and trace
length) and stops with an error if either side did other work. The eval step is the
forward pass alone (no gradient, no penalty: ``training=False`` / ``model.eval()`` under
``torch.no_grad()``), logits included.

Timing: each side gets 3 warm-up steps; then rounds of ``--round-steps`` steps of each
side in turn (peer, graph, XLA, the order reversed every other round, the train steps
first, then the eval steps), until each side has ``--repeats`` timed steps, so drift on a
shared machine reaches every side alike. The peer times its own steps in its process;
each side idles while another runs, with a pause of half a second between sides so that
the last side's spinning worker threads are idle. Medians per side, in ms. PyTorch
(``torch.set_num_threads``) and TensorFlow (intra-op and inter-op pools) get the same
``--threads``, by default every core this process may run on. ``--batch`` and
``--width`` exist for quick checks of the script; the comparison is at 245 and 256.

What stays unequal: each side keeps its own initialisation (the official PyTorch
``Linear`` defaults; our ``RandomNormal(0.01)`` kernels), so the values differ while the
counts do not. The official Anderson starts with two plain evaluations, recomputes its
whole ``m x m`` Gram matrix each step and reads two batch-wide norms to the host each
step; ours updates one Gram row per step and proposes one last point it never
evaluates. The official adjoint solve starts from zero (its first product is of a zero
vector), ours from the upstream gradient; both make 31 products.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402
import report  # noqa: E402

DEFAULT_PEER_PYTHON = os.environ.get("MMFUSION_PEER_PYTHON")
OFFICIAL_FILES = ("DEQ_fusion.py", "solver.py", "jacobian.py")
MODALITIES = 3
CLASSES = 2
FORWARD_EVALS = 30  # forward solve: evaluations of the update
BACKWARD_EVALS = 31  # adjoint solve: vector-Jacobian products
TOL = 1e-30  # no solve meets it
JACOBIAN_WEIGHT = 20.0
JACOBIAN_PROBES = 2
LEARNING_RATE = 1e-4
ANDERSON_MEMORY = 6  # the official anderson()'s m
WARMUP = 3
# Seconds between one side's round and the next side's.
PAUSE_S = 0.5


def make_data(batch, width, seed):
    """Inputs, labels and the fixed head, from numpy's PCG64: the driver draws the same."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(batch, width)).astype(np.float32) for _ in range(MODALITIES)]
    labels = rng.integers(0, CLASSES, batch).astype(np.int64)
    head_w = (rng.normal(size=(width, CLASSES)) / np.sqrt(width)).astype(np.float32)
    head_b = np.zeros(CLASSES, np.float32)
    return xs, labels, head_w, head_b


# The peer's driver: written to a temporary file at run time. It answers one JSON line
# per JSON command on stdin; the official code prints each solve's nstep, so its stdout
# goes to /dev/null and the protocol uses the original stdout.
PEER_DRIVER = r'''
import json, os, sys, time
config = json.loads(sys.argv[1])
protocol = sys.stdout
sys.stdout = open(os.devnull, "w")

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(config["threads"])
torch.solve = lambda B, A: (torch.linalg.solve(A, B),)  # removed from PyTorch (a stub that raises)
torch.Tensor.cuda = lambda self, *a, **k: self
torch.cuda.synchronize = lambda *a, **k: None
sys.path.insert(0, config["code"])
import solver as official_solver
from DEQ_fusion import DEQFusion

rng = np.random.default_rng(config["seed"])
B, W, N = config["batch"], config["width"], config["modalities"]
xs = [torch.from_numpy(rng.normal(size=(B, W)).astype(np.float32)) for _ in range(N)]
labels = torch.from_numpy(rng.integers(0, config["classes"], B).astype(np.int64))
head_w = torch.from_numpy((rng.normal(size=(W, config["classes"])) / np.sqrt(W)).astype(np.float32))
head_b = torch.zeros(config["classes"])

torch.manual_seed(config["seed"])
model = DEQFusion(W, N, f_thres=config["f_thres"], b_thres=config["b_thres"], stop_mode="abs", solver="anderson")
count = {"f": 0, "b": 0, "f_solves": 0, "b_solves": 0, "f_calls": 0}
info = {}


def counting_solver(key, name):
    def solve(f, x0, **kwargs):
        def counted(z):
            count[key] += 1
            return f(z)
        count[key + "_solves"] += 1
        r = official_solver.anderson(counted, x0, eps=config["eps"], **kwargs)
        info[name] = {"nstep": r["nstep"], "trace_length": len(r["abs_trace"]), "threshold": r["threshold"],
                      "stop_mode": kwargs.get("stop_mode", "rel (default)")}
        return r
    return solve


model.f_solver, model.b_solver = counting_solver("f", "forward"), counting_solver("b", "backward")
optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])


def train_step():
    optimizer.zero_grad(set_to_none=True)
    fused, jac_loss, _ = model(xs)
    loss = F.cross_entropy(fused @ head_w + head_b, labels) + config["jacobian_weight"] * jac_loss.mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def eval_step():
    with torch.no_grad():
        fused, _, _ = model(xs)
        return (fused @ head_w + head_b).sum().item()  # the sum of the logits, as our eval step returns


def timed(step, n):
    model.train(step is train_step)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def checked(step):
    """One step, with the evaluations of the update (every call of the official
    DEQFusionLayer, in and out of the solver) and of the adjoint map counted."""
    model.train(step is train_step)
    for key in count:
        count[key] = 0
    info.clear()
    hook = model.func_.register_forward_hook(lambda *a: count.__setitem__("f_calls", count["f_calls"] + 1))
    try:
        value = step()
    finally:
        hook.remove()
    return dict(count, value=value, **info)


def answer(obj):
    protocol.write(json.dumps(obj) + "\n")
    protocol.flush()


answer({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "parameters": int(sum(p.numel() for p in model.parameters()))})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
        break
    step = train_step if cmd["phase"] == "train" else eval_step
    answer({"times": timed(step, cmd["n"])} if cmd["cmd"] == "time" else checked(step))
'''


class Peer:
    """The official code in a subprocess, driven one JSON line at a time."""

    def __init__(self, python, config):
        self.file = tempfile.NamedTemporaryFile("w", suffix="_deq_peer.py", delete=False)
        self.file.write(PEER_DRIVER)
        self.file.close()
        self.proc = subprocess.Popen([python, self.file.name, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        try:
            self.info = self._read()
        except BaseException:
            os.unlink(self.file.name)
            raise

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"The peer driver exited (status {self.proc.wait()}); see its messages above.")
        return json.loads(line)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        os.unlink(self.file.name)


def check_peer(python, code):
    """Exit with a message saying what to pass when the peer's Python or code is missing."""
    missing = [name for name in OFFICIAL_FILES if not os.path.isfile(os.path.join(code or "", name))]
    if not code or missing:
        raise SystemExit(
            f"The official DEQ fusion code is not in --peer-code {code!r} (missing {', '.join(missing)}). Pass "
            "--peer-code DIR, DIR holding DEQ_fusion.py, solver.py and jacobian.py of jinhong-ni/DEQFusion.")
    if not (python and os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SystemExit(f"No Python at --peer-python {python!r}. Pass --peer-python PYTHON, a Python with PyTorch "
                         "and numpy installed.")
    done = subprocess.run([python, "-c", "import torch, numpy"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"--peer-python {python} cannot import torch and numpy:\n{done.stderr.strip()}\n"
                         "Pass --peer-python PYTHON, a Python with PyTorch and numpy installed.")


class Ours:
    """DEQFusion, the fixed head and Adam in one ``tf.function`` per step."""

    def __init__(self, args, jit_compile):
        import keras
        import tensorflow as tf

        from keras_mmfusion.equilibrium import ImplicitAdjoint
        from keras_mmfusion.layers import DEQFusion

        keras.utils.set_random_seed(args.seed)
        xs, labels, head_w, head_b = make_data(args.batch, args.width, args.seed)
        self.xs = [tf.constant(x) for x in xs]
        self.labels = tf.constant(labels)
        head_w, head_b = tf.constant(head_w), tf.constant(head_b)
        self.layer = layer = DEQFusion(
            units=args.width, num_groups=4, solver="anderson", solver_options={"memory": args.memory},
            max_iter=FORWARD_EVALS, tol=TOL, stop_mode="abs",
            backward=ImplicitAdjoint(max_iter=BACKWARD_EVALS, tol=TOL, stop_mode="abs"),
            jacobian_weight=JACOBIAN_WEIGHT, jacobian_probes=JACOBIAN_PROBES, seed=args.seed)
        layer(self.xs)  # build
        variables = layer.trainable_variables
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
        optimizer.build(variables)
        self.parameters = int(sum(np.prod(v.shape) for v in variables))

        @tf.function(jit_compile=jit_compile)
        def train(xs, labels):
            with tf.GradientTape() as tape:
                logits = layer(xs, training=True) @ head_w + head_b
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
                loss += tf.add_n(layer.losses)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        @tf.function(jit_compile=jit_compile)
        def evaluate(xs):
            return tf.reduce_sum(layer(xs, training=False) @ head_w + head_b)

        self.steps = {"train": lambda: train(self.xs, self.labels).numpy(), "eval": lambda: evaluate(self.xs).numpy()}

    def time(self, phase, n):
        step, times = self.steps[phase], []
        for _ in range(n):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times

    def check(self, phase):
        value = float(self.steps[phase]())
        return dict({k: float(v) for k, v in self.layer.last_stats.items()}, value=value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-code", default=None, help="folder with the official DEQ_fusion.py, solver.py, "
                                                          "jacobian.py (jinhong-ni/DEQFusion)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="a Python with PyTorch and numpy "
                                                                           "(default: $MMFUSION_PEER_PYTHON)")
    parser.add_argument("--batch", type=int, default=245)
    parser.add_argument("--width", type=int, default=256, help="the modalities' and the states' width")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per side and phase")
    parser.add_argument("--round-steps", type=int, default=5, help="steps of one side in a row before the next")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="PyTorch threads and TensorFlow intra- and inter-op threads (default: every core "
                             "this process may run on)")
    parser.add_argument("--memory", type=int, default=ANDERSON_MEMORY,
                        help=f"our Anderson history (default {ANDERSON_MEMORY}, the official m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                        "perf_vs_peer.json"))
    report.add_option(parser)
    args = parser.parse_args()
    if args.width % 4:
        parser.error("--width must be divisible by 4 (the official GroupNorm has 4 groups)")
    check_peer(args.peer_python, args.peer_code)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    config = dict(code=os.path.abspath(args.peer_code), batch=args.batch, width=args.width, modalities=MODALITIES,
                  classes=CLASSES, seed=args.seed, threads=args.threads, f_thres=FORWARD_EVALS,
                  b_thres=BACKWARD_EVALS, eps=TOL, lr=LEARNING_RATE, jacobian_weight=JACOBIAN_WEIGHT)
    print(f"DEQ fusion train step and eval: official PyTorch code (peer) against keras_mmfusion; batch {args.batch}, "
          f"{MODALITIES} modalities of width {args.width}, Anderson, {FORWARD_EVALS} forward and {BACKWARD_EVALS} "
          f"adjoint evaluations, Jacobian penalty weight {JACOBIAN_WEIGHT:g} with {JACOBIAN_PROBES} probes, "
          f"Adam lr {LEARNING_RATE:g}; {args.threads} thread(s) on each side (torch.set_num_threads; TensorFlow "
          f"intra- and inter-op)")
    peer = Peer(args.peer_python, config)
    try:
        with report.unrecorded():
            sides = {"peer": None, "graph": Ours(args, jit_compile=False), "xla": Ours(args, jit_compile=True)}
        print(f"peer: torch {peer.info['torch']}, {peer.info['threads']} thread(s), {peer.info['parameters']} "
              f"parameters; ours: TensorFlow {tf.__version__}, {sides['graph'].parameters} parameters; our step: "
              "one tf.function of GradientTape + keras.optimizers.Adam.apply_gradients")

        def run(side, phase, n):
            if side == "peer":
                return peer.ask(cmd="time", phase=phase, n=n)["times"]
            return sides[side].time(phase, n)

        times = {phase: {side: [] for side in sides} for phase in ("train", "eval")}
        with report.unrecorded():
            for phase in times:
                for side in sides:  # warm-up; the first call traces (and compiles) our step
                    run(side, phase, WARMUP)
            rounds = -(-args.repeats // args.round_steps)
            for r in range(rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for phase in times:
                    for side in order:
                        n = min(args.round_steps, args.repeats - len(times[phase][side]))
                        times[phase][side] += run(side, phase, n)
                        # OpenMP's and TensorFlow's worker threads spin for a while after
                        # their last task; a pause keeps them from taking the next side's cores.
                        time.sleep(PAUSE_S)

        checks = {"peer": {phase: peer.ask(cmd="check", phase=phase) for phase in times}}
        with report.unrecorded():
            for side in ("graph", "xla"):
                checks[side] = {phase: sides[side].check(phase) for phase in times}
    finally:
        peer.close()

    print("\nsolver work in one step (checked after the timing)")
    failures = []
    p = checks["peer"]["train"]
    print(f"  peer train: {p['f_solves']} forward solve, {p['f']} evaluations of the update in it "
          f"(official nstep {p['forward']['nstep']}, trace length {p['forward']['trace_length']}, threshold "
          f"{p['forward']['threshold']}), {p['f_calls']} evaluations in all; {p['b_solves']} adjoint solve, "
          f"{p['b']} adjoint evaluations (official nstep {p['backward']['nstep']}, trace length "
          f"{p['backward']['trace_length']}, threshold {p['backward']['threshold']}, stop mode "
          f"{p['backward']['stop_mode']}); loss {p['value']:.4g}")
    if (p["f_solves"], p["f"], p["f_calls"], p["b_solves"], p["b"]) != (1, FORWARD_EVALS, FORWARD_EVALS + 1, 1,
                                                                       BACKWARD_EVALS):
        failures.append("peer train")
    p = checks["peer"]["eval"]
    print(f"  peer eval: {p['f_solves']} forward solve, {p['f']} evaluations of the update in it, {p['f_calls']} "
          f"in all; {p['b_solves']} adjoint solves; sum of logits {p['value']:.4g}")
    if (p["f_solves"], p["f"], p["f_calls"], p["b_solves"]) != (1, FORWARD_EVALS, FORWARD_EVALS, 0):
        failures.append("peer eval")
    for side, label in (("graph", "ours (graph)"), ("xla", "ours (XLA)")):
        t, e = checks[side]["train"], checks[side]["eval"]
        print(f"  {label} train: last_stats steps {t['steps']:.0f}, backward_steps {t['backward_steps']:.0f}, loss "
              f"{t['value']:.4g}; eval: steps {e['steps']:.0f}, sum of logits {e['value']:.4g}")
        if (t["steps"], t["backward_steps"], e["steps"]) != (FORWARD_EVALS, BACKWARD_EVALS, FORWARD_EVALS):
            failures.append(label)
    for side in checks:  # a non-finite loss would time other arithmetic
        if not all(np.isfinite(checks[side][phase]["value"]) for phase in times):
            failures.append(f"{side} (non-finite loss or logits)")

    medians = {phase: {side: 1e3 * float(np.median(v)) for side, v in by_side.items()}
               for phase, by_side in times.items()}
    print(f"\nmedian ms over {args.repeats} steps per side, after {WARMUP} warm-up steps, in interleaved rounds of "
          f"{args.round_steps}")
    print("| | peer | ours (graph) | ours (XLA) | ratio (XLA/peer) |")
    print("|---|---:|---:|---:|---:|")
    for phase, label in (("train", "train step"), ("eval", "eval")):
        m = medians[phase]
        print(f"| {label} | {m['peer']:.1f} | {m['graph']:.1f} | {m['xla']:.1f} | {m['xla'] / m['peer']:.2f} |")
    info = machine()
    print(f"machine: {info['cpu_cores']} CPU cores ({args.threads} thread(s) used per side), "
          f"{', '.join(info['gpu']) if info['gpu'] else 'no GPU'}, {info['platform']}; TensorFlow "
          f"{info['tensorflow']}, Keras {info['keras']}, torch {peer.info['torch']}")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"config": dict(vars(args), modalities=MODALITIES, forward_evals=FORWARD_EVALS,
                                  backward_evals=BACKWARD_EVALS, tol=TOL, jacobian_weight=JACOBIAN_WEIGHT,
                                  jacobian_probes=JACOBIAN_PROBES, learning_rate=LEARNING_RATE, warmup=WARMUP),
                   "median_ms": medians, "times_s": times, "checks": checks,
                   "peer": peer.info, "machine": info}, f, indent=2)
    print(f"wrote {args.json}")
    if failures:
        raise SystemExit(f"unequal work: {', '.join(failures)}; see the counts above")


if __name__ == "__main__":
    report.run(main, "perf_vs_peer")
