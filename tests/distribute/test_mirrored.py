"""tf.distribute.MirroredStrategy over two logical CPUs gives single-device training, and the
layers' statistics describe the global batch (not a sum or one replica's share)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mirrored_step.py")


# The fusion layers with statistics, routing, add_loss terms or per-replica labels; a layer
# without any of them (concat, DenseFusion) has nothing a replica could get wrong that these
# do not already exercise. DEQ fusion and DynMM run in the standard classifier with their
# modality mask only: their statistics, routing, cost terms and logs are those of the
# unmasked layers; the unmasked DEQ layer, and fit's path, are the reference kind's.
KINDS = ["reference", "deq-masked", "dynmm-masked"]


@pytest.fixture(scope="module")
def reports():
    """``{kind: {"single": report, "mirrored": report}}``, from one run of the script."""
    done = subprocess.run([sys.executable, SCRIPT, *KINDS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_one_mirrored_step_equals_the_single_device_step(kind, reports):
    single, mirrored = reports[kind]["single"], reports[kind]["mirrored"]
    kind = kind.split("-")[0]
    # float32: the replicas' gradients are summed in another order than one device's. At
    # its initial weights about half of the reference model's forward solves and some of
    # its adjoint solves end unconverged, where the Anderson iterates amplify rounding:
    # two runs of the same single-device step, one thread each, differ by up to 3e-4 in a
    # weight after the SGD step (and their largest adjoint residual by a factor of 2).
    # Its step moves the gate, encoder and confidence weights by 0.1-0.3, so a gradient
    # summed over the replicas, or one replica's alone, is still far outside 1e-3.
    atol = 1e-3 if kind == "reference" else 1e-4
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol)
    np.testing.assert_allclose(mirrored["logs"]["loss"], single["logs"]["loss"], rtol=1e-4)
    if kind == "reference":
        # Every log: the loss, each gate's sparsity, each confidence head's loss (from each
        # replica's own labels) and the training solve's statistics, each describing the
        # global batch. (Not every solve of this model converges, so the statistics of the
        # prediction after the step, from weights that differ by float rounding, are not
        # compared.)
        assert {"feature_gate_0_sparsity", "confidence_2_loss", "deq_steps"} <= set(single["logs"])
        assert set(mirrored["logs"]) == set(single["logs"])
        for key, value in single["logs"].items():
            if key == "deq_backward_residual":
                # Unconverged adjoint solves: their largest residual varies by a factor of 2
                # between identical single-device runs. How the adjoint statistics combine
                # the replicas is checked on the DEQ classifier below, whose solves converge.
                assert 0 < mirrored["logs"][key] < 1, key
            elif key == "deq_backward_converged":
                # An adjoint solve that ends near its tolerance may end on the other side of
                # it: one of the 64 samples (a sum over the 2 replicas would double it).
                assert mirrored["logs"][key] == pytest.approx(value, abs=1 / 64 + 1e-6), key
            else:
                assert mirrored["logs"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    if kind == "deq":
        # Each sample's solve is its own, so the global batch's steps are the most any
        # replica took (a sum over the 2 replicas would double them) and its converged
        # fraction that of all samples. Its largest residual is the largest of any
        # replica's; near the tolerance (1e-5) Anderson's least squares amplify the float32
        # rounding of the replicas' smaller batches, so residuals are checked against the
        # tolerance, not against each other.
        assert 0 < mirrored["last_stats"]["steps"] < 30
        # So it is for the adjoint solves of the implicit gradient, each sample's own too.
        assert mirrored["last_stats"]["backward_steps"] > 0
        for stats in ("last_stats", "logs"):
            prefix = "" if stats == "last_stats" else "deq_"
            for key in ("steps", "converged", "backward_steps", "backward_converged"):
                assert mirrored[stats][prefix + key] == pytest.approx(single[stats][prefix + key], abs=1e-6), key
            for key in ("residual", "backward_residual"):
                assert 0 < mirrored[stats][prefix + key] <= 1e-5 and 0 < single[stats][prefix + key] <= 1e-5, key
    if kind == "dynmm":
        assert len(mirrored["last_routing"]) == 64
        assert mirrored["last_routing"] == single["last_routing"]
        for key in [k for k in single["logs"] if k.startswith("dynmm_")]:
            assert mirrored["logs"][key] == pytest.approx(single["logs"][key], abs=1e-6), key
