"""Equinox layers built on `odeint`: `NeuralODE`, `CNF` and the `MLPField` vector field."""

from ._cnf import CNF as CNF
from ._mlp import MLPField as MLPField
from ._neural_ode import NeuralODE as NeuralODE
