"""Errors users see: each names the problem and the fix in one sentence."""

from __future__ import annotations


class PerturbDiffError(ValueError):
    """Base class of every user-facing error; the command line prints it as one line."""


class UnknownPluginError(PerturbDiffError, LookupError):
    """A plug-in name that no installed distribution registers."""


class PluginLoadError(PerturbDiffError, ImportError):
    """A registered plug-in that fails to import or does not implement its interface."""


class InputError(PerturbDiffError):
    """Tensors or arrays that break a documented contract (shape, NaN, empty set)."""


class DataError(PerturbDiffError):
    """An AnnData file or object that cannot be used as given (missing key, bad values)."""


class ConfigError(PerturbDiffError):
    """A configuration key that is unknown or of the wrong type."""
