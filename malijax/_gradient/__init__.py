from .base import AbstractGradient as AbstractGradient
from .direct import Direct as Direct
