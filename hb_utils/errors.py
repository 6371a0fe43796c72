"""The exception types the kit raises for *user* errors.

Every problem a user can fix (a bad parameter, missing data, an adapter from another model …) is
raised as a subclass of :class:`HBError` with a message that names the problem and the fix, so
notebooks and the ``hb`` command can show one clear line instead of a traceback from deep inside
pandas or transformers. Bugs in the kit itself stay ordinary Python exceptions.
"""

from __future__ import annotations


class HBError(Exception):
    """Base class for every user-facing error of the kit."""


class ConfigError(HBError, ValueError):
    """An experiment parameter is unknown, of the wrong type or out of range."""


class DataError(HBError):
    """The data source is missing, unreadable, or leaves too few pairs after filtering."""


class ModelError(HBError):
    """A model, tokenizer or adapter cannot be loaded or does not match the config."""


class RunError(HBError):
    """A run directory conflicts with the config, or a stage cannot run."""
