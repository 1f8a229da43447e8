"""The default settings and allowed choices of the equilibrium solves, in one place.

:func:`keras_mmfusion.equilibrium.fixed_point_solve`, the registered solvers, the
adjoint objects and :class:`keras_mmfusion.layers.DEQFusion` read their defaults from
here. The module imports nothing, so every other module may import it.
"""

#: The forward solver of ``fixed_point_solve`` and ``DEQFusion``.
SOLVER = "anderson"
#: The largest number of evaluations of the update in one forward solve.
MAX_ITER = 50
#: The stopping tolerance on every sample's residual.
TOL = 1e-4
#: ``"rel"``: ``||f(z) - z|| / ||f(z)||``; ``"abs"``: ``||f(z) - z||``.
STOP_MODE = "rel"
STOP_MODES = ("abs", "rel")

#: The gradient of a solve: the shorthand names of the three adjoint objects.
BACKWARD = "implicit"
BACKWARD_MODES = ("implicit", "phantom", "unrolled")
#: The adjoint solve stops relative to the upstream gradient's norm, so that the
#: implicit gradient is linear in the loss at every scale.
BACKWARD_STOP_MODE = "rel"
#: The unrolled steps ``k`` and the damping ``lam`` of the phantom gradient (Geng et
#: al., "On Training Implicit Models", 2021).
PHANTOM_STEPS = 5
PHANTOM_DAMPING = 0.5
#: The plain iterations of a warm-up call (Bai et al.'s pretraining of DEQ models).
WARMUP_DEPTH = 5
