from .aca import ACA as ACA
from .base import AbstractGradient as AbstractGradient
from .direct import Direct as Direct
from .mali import MALI as MALI
