"""malijax: differentiate through ODE solves in JAX, with the gradient strategies of
the Neural-ODE literature under one `odeint`."""

import importlib.metadata

from ._errors import ReconstructionWarning as ReconstructionWarning
from ._errors import SolveError as SolveError
from ._gradient import AbstractGradient as AbstractGradient
from ._gradient import ACA as ACA
from ._gradient import Adjoint as Adjoint
from ._gradient import ANODE as ANODE
from ._gradient import Direct as Direct
from ._gradient import ForwardMode as ForwardMode
from ._gradient import MALI as MALI
from ._gradient import SymplecticAdjoint as SymplecticAdjoint
from ._odeint import odeint as odeint
from ._odeint import solve as solve
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solver import ALF as ALF
from ._solver import AbstractReversibleSolver as AbstractReversibleSolver
from ._solver import AbstractRungeKutta as AbstractRungeKutta
from ._solver import AbstractSolver as AbstractSolver
from ._solver import Bosh3 as Bosh3
from ._solver import ButcherTableau as ButcherTableau
from ._solver import Dopri5 as Dopri5
from ._solver import Euler as Euler
from ._solver import Heun as Heun
from ._solver import Midpoint as Midpoint
from ._solver import RK4 as RK4
from ._solver import Reversible as Reversible
from ._solver import ReversibleHeun as ReversibleHeun
from ._solver import Tsit5 as Tsit5

try:
    __version__ = importlib.metadata.version("malijax")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"

from . import compat as compat  # noqa: E402 - after the names it builds on
from . import nn as nn  # noqa: E402
