"""The one exception type users see as a one-line error.

Every module raises MiscError (or a subclass) for bad input: the CLI prints ``miscnet: <message>``
and exits non-zero, without a traceback. Anything else escaping is a bug.
"""


class MiscError(Exception):
    """Bad input or an impossible request, explained in one line."""


class BitstreamError(MiscError):
    """A .misc file, layer or packet that is corrupt, truncated or of an unknown version."""


class SemanticsError(MiscError):
    """A malformed sidecar / CSV, or text that breaks the configured limits."""


class BudgetError(MiscError):
    """A byte budget that cannot be met."""
