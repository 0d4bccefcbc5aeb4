"""Pure-torch references, written to be read: each line beside the equation it implements."""
from . import random
from . import gaussian

__all__ = ["random", "gaussian"]
