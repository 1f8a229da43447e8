"""A fixed order of summation, so that a seed gives the same training run bit for bit.

TensorFlow's graph optimizer (Grappler) rewrites chains of additions into ``AddN`` ops,
and the ``AddN`` kernel accumulates into whichever of its input buffers it may reuse,
which it moves to the front of the sum. Which buffer is free depends on the order in
which TensorFlow's threads ran the ops before it, so a sum of three or more terms is
added in a run-dependent order. The gradients of DEQ fusion's solver loops hold such
sums: of 100 repeated calls of one traced gradient of the standard DEQ classifier, 12
(Anderson) and 9 (Broyden) differed from the call before, by up to 1e-6, with the rewrite
on, and none without it, at the same speed (``benchmarks/reproducibility.py``); training
amplifies such differences over its steps. XLA-compiled steps do not use the kernel.
"""

import contextlib

import tensorflow as tf

REWRITE = "arithmetic_optimization"


@contextlib.contextmanager
def fixed_summation_order():
    """Run the block with Grappler's arithmetic rewrites off, then restore the setting.

    The setting applies to the ``tf.function`` graphs first run inside the block (Grappler
    optimises a graph when it is first run), such as the training and evaluation steps
    of a ``fit`` called there.
    """
    before = tf.config.optimizer.get_experimental_options().get(REWRITE, True)
    tf.config.optimizer.set_experimental_options({REWRITE: False})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({REWRITE: before})
