"""Constructor arguments captured by a base class, so that a plug-in's ``config()`` is written once.

A class deriving from :class:`CapturesArguments` records, before its constructor runs, the keyword
arguments of the outermost constructor call (positional ones by name, defaults filled in, ``**kwargs``
spread out), as diffusers' ``register_to_config`` does. :meth:`CapturesArguments.config` returns them,
which is what ``load(group, name, **config)`` needs to rebuild the object from a checkpoint. A
subclass that defines its own ``config()`` overrides it, so older plug-ins keep working.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

#: The instance attribute holding the captured arguments (written to ``__dict__`` directly, so that
#: it works before ``nn.Module.__init__`` has run and on frozen dataclasses).
_CAPTURED = "_captured_arguments"


class CapturesArguments:
    """Mixin: ``config()`` returns the keyword arguments the object was built with."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _capturing(cls.__dict__["__init__"])  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        """Every constructor keyword argument, defaults included: ``type(self)(**config())`` rebuilds this object."""
        captured = self.__dict__.get(_CAPTURED)
        if captured is None:
            raise ConfigError(
                f"{type(self).__name__} was built with extra positional arguments (*args), which a configuration "
                f"cannot name; take keyword arguments, or define {type(self).__name__}.config()."
            )
        return dict(captured)

    def record_arguments(self, **resolved: Any) -> None:
        """Store the values the constructor resolved some arguments to (a size preset's ``hidden=None`` to
        its number), so that :meth:`config` names what was built, not only what was asked for."""
        captured = self.__dict__.get(_CAPTURED)
        if captured is not None:
            captured.update(resolved)


def _capturing(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` preceded by the capture of its arguments, unless an outer constructor captured them already."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _CAPTURED not in self.__dict__:
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                return init(self, *args, **kwargs)  # the constructor reports its own wrong arguments
            self.__dict__[_CAPTURED] = _keywords(bound)
        init(self, *args, **kwargs)

    return __init__


def _keywords(bound: inspect.BoundArguments) -> dict[str, Any] | None:
    """The bound arguments (but ``self``) as keywords, defaults applied; ``None`` when ``*args`` received some."""
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            out[name] = value
    return out
