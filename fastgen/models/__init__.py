"""Reference generative models in plain torch."""
from fastgen.models import gan  # noqa: F401
