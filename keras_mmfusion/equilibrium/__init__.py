"""Equilibrium (fixed-point) solvers and their gradients, in plain TensorFlow.

Nothing here depends on Keras layers: ``f`` is any differentiable TensorFlow function.
"""

from keras_mmfusion.equilibrium.iteration import SolverStats, residual_norm
from keras_mmfusion.equilibrium.jacobian import hutchinson_jacobian_norm
from keras_mmfusion.defaults import BACKWARD_MODES
from keras_mmfusion.equilibrium.adjoint import ImplicitAdjoint, PhantomAdjoint, UnrolledAdjoint, solve_adjoint
from keras_mmfusion.equilibrium.solve import fixed_point_solve
from keras_mmfusion.equilibrium.reference_solver import reference_anderson_solve
from keras_mmfusion.equilibrium.solvers import (
    anderson_solve,
    available_solvers,
    broyden_solve,
    fixed_point_iteration,
    get_solver,
    register_solver,
)

__all__ = [
    "BACKWARD_MODES",
    "ImplicitAdjoint",
    "PhantomAdjoint",
    "SolverStats",
    "UnrolledAdjoint",
    "anderson_solve",
    "available_solvers",
    "broyden_solve",
    "fixed_point_iteration",
    "fixed_point_solve",
    "get_solver",
    "hutchinson_jacobian_norm",
    "reference_anderson_solve",
    "register_solver",
    "residual_norm",
    "solve_adjoint",
]
