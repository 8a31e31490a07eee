"""Equinox layers built on `odeint`: `NeuralODE`, `CNF`, and the `MLPField` and
`ConvField` vector fields."""

from ._cnf import CNF as CNF
from ._conv import ConvField as ConvField
from ._mlp import MLPField as MLPField
from ._neural_ode import NeuralODE as NeuralODE
