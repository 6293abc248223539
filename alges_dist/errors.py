"""The errors a user can fix, as the project's own classes.

The ``alges`` command prints an ``AlgesError`` (and an OSError: a missing file, a full disk)
as one line naming the setting, file, row or key at fault, and exits 2. Anything else that
escapes a command is a defect of ours: it prints "internal error in STAGE: ...", keeps the
traceback in ``RUN/run.log`` and exits 1. The classes also derive from the builtin a caller
would catch (``InputError`` is a ValueError, ``UnknownName`` a KeyError), so
``except ValueError`` and ``pytest.raises(ValueError)`` keep working. Stdlib only.
"""

from __future__ import annotations

__all__ = ["AlgesError", "InputError", "UnknownName"]


class AlgesError(Exception):
    """An expected failure: bad input, a refused setting, a failed check, a busy run folder."""


class InputError(AlgesError, ValueError):
    """A setting, file, row or argument is wrong; the message says which and what is allowed."""


class UnknownName(AlgesError, KeyError):
    """A name (strategy, architecture, stage, format) that the registry does not hold."""

    def __str__(self) -> str:  # KeyError's str() quotes the message; this is a sentence
        return str(self.args[0]) if self.args else ""
