"""The one registry of explanation methods: ``legrad bench``, ``legrad explain --method`` and the app's
method choice all read it.

A new method is one module (a :class:`~legrad.methods.base.Method` subclass) plus one call of
:func:`register_method` (see docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

from typing import Any

from .attention import AttentionRollout, RawAttention
from .base import Method
from .gradients import CheferCAM, GradCAM
from .legrad import LeGrad

__all__ = ["METHODS", "register_method", "method_names", "method_class", "make_method"]

#: Every method by registry name, LeGrad first.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method], *, replace: bool = False) -> type[Method]:
    """Registers a :class:`Method` subclass under its ``name`` (usable as a class decorator).

    Raises:
        TypeError: if ``cls`` is not a Method subclass.
        ValueError: for an empty or ``@``-holding name, or a name already taken (unless ``replace``).
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a legrad.methods.Method subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or "@" in name or name != name.strip():
        raise ValueError(f"{cls.__name__}.name must be a non-empty name without '@' or spaces, got {name!r}")
    if name in METHODS and METHODS[name] is not cls and not replace:
        raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__}); "
                         "pass replace=True to replace it")
    METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    """The registered names, in registration order."""
    return list(METHODS)


def method_class(name: str) -> tuple[type[Method], dict[str, Any]]:
    """The class of ``name`` and the options its ``"@K"`` suffix sets (``legrad@-2``, ``rollout@3``).

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: naming the known methods for an unknown one, or for an invalid ``"@K"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    base, sep, layer = name.partition("@")
    cls = METHODS.get(base)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if not sep:
        return cls, {}
    try:
        value = int(layer)
    except ValueError:
        value = None
    if cls.first_block is None or value is None:
        options = ", ".join(f"{k}@K" for k, c in METHODS.items() if c.first_block)
        raise ValueError(f"invalid method {name!r}: a first block can be given as {options} (K an integer)")
    return cls, {cls.first_block: value}


def make_method(name: str, model: Any, **options: Any) -> Method:
    """``METHODS[name](model, **options)``, with the ``"@K"`` suffix's option (see :func:`method_class`)."""
    cls, fixed = method_class(name)
    return cls(model, **{**options, **fixed})


for _cls in (LeGrad, RawAttention, AttentionRollout, GradCAM, CheferCAM):
    register_method(_cls)
