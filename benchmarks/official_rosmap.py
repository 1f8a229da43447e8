"""Runs the official DEQ-fusion ROSMAP code (Ni et al., arXiv 2306.16645) in a subprocess.

The code is the ``experiments/BRCA`` folder of the repository jinhong-ni/DEQFusion
(``mm_model.py``, ``solver.py``, ``jacobian.py``, ``train_test_deq.py``, ``utils.py``),
which trains the ROSMAP classifier too. It stays unmodified in a folder outside this
project (``--peer-code DIR``); a driver that this module writes to a temporary file
imports it with a Python that has PyTorch, scikit-learn and matplotlib (``--peer-python``,
default ``$MMFUSION_PEER_PYTHON``). The driver needs these runtime shims, none of which
edits the official files: ``torch.solve`` (removed from PyTorch) becomes
``torch.linalg.solve`` with its arguments swapped, and ``Tensor.cuda()``,
``Module.cuda()`` and ``torch.cuda.synchronize`` do nothing (a CPU run).

Four modes:

- ``recipe``: per seed, ``torch.manual_seed(seed)`` and the official ``train()`` with the
  ROSMAP settings of its ``main.py`` call (all three views, Jacobian weight 20, Anderson,
  absolute stopping, ``f_thres``/``b_thres`` as given); the test probabilities of its last
  test call (epoch 1000) are returned, to be scored by this project's scorer, and those of
  every test call (``train()`` tests every 50 epochs, from epoch 0) as
  ``test_probabilities``.
- ``parity``: the official ``MMDynamic`` on the official data pipeline, with dropout off
  or with given masks (each step's from NumPy's ``default_rng([mask_seed, step])``),
  solvers that never stop early, fixed Jacobian probes, and the official ``train_epoch``
  (Adam with coupled weight decay, global-norm clipping at 30, ``StepLR``) for a number of
  steps, from the seed's initial weights or from given ones (``start``, a ``state_dict``
  in an npz file); its initial weights and inputs, its first step's gradients and its final
  weights are written to npz files, and every step's loss terms, gradient norm and solver
  residuals to the JSON result.
- ``initial``: per seed, the initial weights the ``recipe`` mode's run of that seed starts
  from (``torch.manual_seed(seed)``, then the official ``train()`` up to the model's
  construction), written to ``<weights>/seed<seed>.npz``; nothing is trained.
- ``evaluate``: the official ``MMDynamic`` loaded with given weights (a ``state_dict`` in an
  npz file) scores the test patients as ``train()`` does (``model.eval()``,
  ``test_epoch``); its probabilities and its solve's lowest relative residual are returned.
"""

import json
import os
import subprocess
import sys
import tempfile

OFFICIAL_FILES = ("mm_model.py", "solver.py", "jacobian.py", "train_test_deq.py", "utils.py")
DEFAULT_PEER_PYTHON = os.environ.get("MMFUSION_PEER_PYTHON")

DRIVER = r'''
import argparse, functools, json, os, sys, time
config = json.loads(sys.argv[1])
real_stdout = sys.stdout
sys.stdout = open(os.devnull, "w")  # the official code prints progress and solver steps

import numpy as np
import torch

torch.set_num_threads(config["threads"])
torch.solve = lambda B, A: (torch.linalg.solve(A, B),)
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.synchronize = lambda *a, **k: None
sys.path.insert(0, config["code"])
import jacobian
import mm_model
import solver
import train_test_deq as ttd

# The official prepare_trte_data reads "<folder>/<view>_tr.csv"; train() picks its ROSMAP
# settings when the folder's name contains "ROSMAP" and writes checkpoints under
# ./model/<folder>, so the run works in a scratch folder with a link named ROSMAP.
os.chdir(config["workdir"])
if not os.path.exists("ROSMAP"):
    os.symlink(config["data"], "ROSMAP")


def recipe_args(seed):
    """The arguments of the official train() call for ROSMAP, as its main.py passes them."""
    return argparse.Namespace(
        name=f"seed{seed}", mode="train", use_mrna=True, use_dna=True, use_mirna=True,
        learning_rate=1e-4, train_epoch=1000, no_deq=False, jacobian_weight=config["jacobian_weight"],
        num_layers=1, f_thres=config["f_thres"], b_thres=config["b_thres"], stop_mode="abs",
        cosine_scheduler=False, use_default_fuse=False, no_print=True, solver="anderson")


def recipe():
    probabilities = []
    test_epoch = ttd.test_epoch

    def recording_test_epoch(data_list, model):
        out = test_epoch(data_list, model)
        probabilities.append(out[0])
        return out

    ttd.test_epoch = recording_test_epoch
    runs = []
    for seed in config["seeds"]:
        probabilities.clear()
        torch.manual_seed(seed)
        started = time.time()
        ttd.train("ROSMAP", "./model/", recipe_args(seed))
        runs.append({"seed": seed, "seconds": time.time() - started,
                     "probabilities": probabilities[-1].tolist(), "test_calls": len(probabilities),
                     "test_probabilities": [p.tolist() for p in probabilities]})
        print(json.dumps({"seed": seed, "seconds": runs[-1]["seconds"]}), file=sys.stderr, flush=True)
    return {"runs": runs}


class StandIn:
    """Stands for a torch module inside an official file: the step's tensors, given in
    ``queue``, replace one function's random draws; every other name is the module's."""

    def __init__(self, module):
        self.module, self.queue = module, []

    def next(self, shape):
        tensor = self.queue.pop(0)
        assert tuple(tensor.shape) == tuple(shape), (tensor.shape, shape)
        return tensor

    def __getattr__(self, name):
        return getattr(self.module, name)


class FixedProbes(StandIn):
    """torch inside the official jacobian.py: randn returns the step's probes."""

    def randn(self, *shape, **kwargs):
        return self.next(shape)


def probes_for(step, shape, dtype):
    rng = np.random.default_rng([config["probe_seed"], step])
    return [torch.from_numpy(rng.standard_normal(shape)).to(dtype) for _ in range(config["probes"])]


class FixedDropout(StandIn):
    """torch.nn.functional inside the official mm_model.py: dropout multiplies by the
    step's mask for the view."""

    def dropout(self, x, p, training=True, inplace=False):
        return x * self.next(x.shape) if training and p else x


def masks_for(step, shape, views, dtype):
    """Each view's dropout mask at ``step``: kept units scaled by 1 / (1 - rate)."""
    rate = config["dropout"]
    rng = np.random.default_rng([config["mask_seed"], step])
    return [torch.from_numpy((rng.random(shape) >= rate) / (1 - rate)).to(dtype) for _ in range(views)]


def parity():
    dtype = {"float64": torch.float64, "float32": torch.float32}[config["dtype"]]
    torch.set_default_dtype(dtype)  # the solver's zero start follows the default dtype
    # A tolerance below zero is never met: both solves run their whole budget.
    solves = []

    def recorded(name):
        def solve(f, x0, **kwargs):
            out = solver.anderson(f, x0, **dict(kwargs, eps=-1.0))
            solves.append((name, out["abs_trace"], out["rel_trace"], out["nstep"]))
            return out
        return solve

    mm_model.anderson = recorded("forward")
    probes = FixedProbes(torch)
    jacobian.torch = probes
    dropout = FixedDropout(torch.nn.functional)
    mm_model.F = dropout
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        if not norms:  # the first step's gradients, before clipping
            names = {id(p): n for n, p in model.named_parameters()}
            np.savez(config["gradients"], **{names[id(p)]: p.grad.detach().numpy() for p in parameters})
        total = clip(parameters, max_norm, *a, **k)
        norms.append(float(total))
        return total

    torch.nn.utils.clip_grad_norm_ = recording_clip
    torch.manual_seed(config["seed"])
    data_tr, _, index, labels = ttd.prepare_trte_data("ROSMAP")
    xs = [x.to(dtype) for x in data_tr]
    y = torch.LongTensor(labels[index["tr"]])
    model = mm_model.MMDynamic([x.shape[1] for x in xs], [config["units"]], 2, dropout=config["dropout"],
                               jacobian_weight=config["jacobian_weight"], f_thres=config["f_thres"],
                               b_thres=config["b_thres"], stop_mode="abs", solver="anderson").to(dtype)
    model.deq_fusion.b_solver = recorded("backward")
    if config.get("start"):  # given initial weights (a state_dict npz) instead of the seed's draw
        start = np.load(config["start"])
        model.load_state_dict({k: torch.from_numpy(start[k]).to(dtype) for k in model.state_dict()})
    np.savez(config["weights"], **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
             **{f"input_{i}": x.numpy() for i, x in enumerate(xs)}, labels=y.numpy())
    sparsity = {}
    for v, layer in enumerate(model.FeatureInforEncoder):
        layer.register_forward_hook(lambda m, i, o, v=v: sparsity.__setitem__(v, torch.sigmoid(o).mean().item()))
    terms = {}
    forward = model.forward

    def recording_forward(*a, **k):
        out = forward(*a, **k)
        terms.update(out[2])
        return out

    model.forward = recording_forward
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config["lr_decay_every"], gamma=0.2)
    state = (xs[0].shape[0], (len(xs) + 1) * config["units"])
    steps = []
    for step in range(config["steps"]):
        solves.clear()
        probes.queue = probes_for(step, state, dtype)
        if config["dropout"]:
            dropout.queue = masks_for(step, (xs[0].shape[0], config["units"]), len(xs), dtype)
        ttd.train_epoch(xs, y, model, optimizer, None, step)
        scheduler.step()
        assert not probes.queue, "the step did not use every probe"
        assert not dropout.queue, "the step did not use every dropout mask"
        forward_solve = [s for s in solves if s[0] == "forward"]
        backward_solve = [s for s in solves if s[0] == "backward"]
        steps.append({
            "total": terms["total"], "cross_entropy": terms["MMLoss"],
            "sparsity": [sparsity[v] for v in range(len(xs))],
            "confidence": [terms[f"confidence_loss_view{v}"] for v in range(len(xs))],
            "jacobian": terms["jacobian"], "grad_norm": norms[-1],
            "forward_evaluations": len(forward_solve[0][1]), "forward_residual": forward_solve[0][1][-1],
            "forward_lowest_step": forward_solve[0][3],
            "backward_evaluations": len(backward_solve[0][1]), "backward_relative": backward_solve[0][2][-1],
            "backward_lowest_step": backward_solve[0][3],
        })
    np.savez(config["final_weights"], **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    return {"steps": steps}


class Built(Exception):
    """Raised with the model as soon as train() has constructed it."""


def initial():
    construct = ttd.MMDynamic

    def constructed(*a, **k):
        raise Built(construct(*a, **k))

    ttd.MMDynamic = constructed
    for seed in config["seeds"]:
        torch.manual_seed(seed)
        try:
            ttd.train("ROSMAP", "./model/", recipe_args(seed))
        except Built as built:
            model = built.args[0]
        else:
            raise AssertionError("train() did not construct MMDynamic")
        np.savez(os.path.join(config["weights"], f"seed{seed}.npz"),
                 **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    return {"seeds": config["seeds"]}


def evaluate():
    """The official model with the given weights (a state_dict npz), scored as train()
    scores it: model.eval() and test_epoch on the official test pipeline."""
    _, data_te, _, _ = ttd.prepare_trte_data("ROSMAP")
    model = mm_model.MMDynamic([x.shape[1] for x in data_te], [config["units"]], 2, dropout=0.5,
                               jacobian_weight=config["jacobian_weight"], f_thres=config["f_thres"],
                               b_thres=config["b_thres"], stop_mode="abs", solver="anderson")
    weights = np.load(config["weights"])
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in model.state_dict()})
    probabilities, trace, _ = ttd.test_epoch(data_te, model)
    return {"probabilities": probabilities.tolist(), "relative_residual": float(min(trace))}


result = {"recipe": recipe, "initial": initial, "parity": parity, "evaluate": evaluate}[config["mode"]]()
result.update(torch=torch.__version__, threads=torch.get_num_threads())
with open(config["out"], "w") as f:
    json.dump(result, f)
'''


def check_peer(python, code):
    """Exit with a message saying what to pass when the official code or its Python is missing."""
    missing = [name for name in OFFICIAL_FILES if not os.path.isfile(os.path.join(code or "", name))]
    if not code or missing:
        sys.exit(
            f"The official DEQ-fusion ROSMAP code is not in --peer-code {code!r} (missing {', '.join(missing)}). "
            "Pass the experiments/BRCA folder of a checkout of jinhong-ni/DEQFusion."
        )
    if not python:
        sys.exit("No Python with PyTorch for the official code: pass --peer-python or set $MMFUSION_PEER_PYTHON.")
    done = subprocess.run([python, "-c", "import torch, numpy, sklearn, matplotlib, scipy, termcolor"],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{python} cannot run the official code (it needs torch, numpy, scipy, scikit-learn, matplotlib "
                 f"and termcolor): {done.stderr.strip().splitlines()[-1]}")


def run_official(python, code, data, mode, threads, **config):
    """Run the driver in ``mode`` on the MOGONET-layout folder ``data``; its JSON result.

    The driver's messages go to this process's stderr; it works in a temporary folder.
    """
    with tempfile.TemporaryDirectory() as workdir:
        driver = os.path.join(workdir, "driver.py")
        with open(driver, "w") as f:
            f.write(DRIVER)
        out = os.path.join(workdir, "result.json")
        settings = dict(config, mode=mode, code=os.path.abspath(code), data=os.path.abspath(data),
                        workdir=workdir, out=out, threads=threads)
        done = subprocess.run([python, driver, json.dumps(settings)], stdout=sys.stderr)
        if done.returncode:
            raise SystemExit(f"The official code's driver exited with status {done.returncode}; see above.")
        with open(out) as f:
            return json.load(f)
