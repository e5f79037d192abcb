"""The channel's one error type, in a module of its own so that every channel module can import it.

``units`` (parsing), ``loss`` (models) and ``trace`` (Mahimahi files) all raise it; keeping it here, below
all of them, keeps the imports one-way (units -> loss -> errors, units -> errors).
"""

from miscnet.core.errors import MiscError


class LinkConfigError(MiscError):
    """A link parameter (rate, time, size, loss spec, trace file) that cannot be used."""
