"""Pure-torch references, written to be read: each line beside the equation it implements."""
from . import random

__all__ = ["random"]
