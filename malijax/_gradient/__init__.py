from .aca import ACA as ACA
from .adjoint import Adjoint as Adjoint
from .anode import ANODE as ANODE
from .base import AbstractGradient as AbstractGradient
from .direct import Direct as Direct
from .forward import ForwardMode as ForwardMode
from .mali import MALI as MALI
from .symplectic import SymplecticAdjoint as SymplecticAdjoint
