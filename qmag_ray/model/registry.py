"""A registry of embedding backbones by name, so configs name a network instead of code paths.

Names are compared after normalisation (lower case, ``-`` and ``_`` ignored), so
``"iResNet-100"``, ``"iresnet_100"`` and ``"iresnet100"`` are the same backbone. This module
imports no torch: factories register themselves when ``qmag_ray.model`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from torch import nn

Factory = Callable[..., "nn.Module"]
F = TypeVar("F", bound=Factory)

_FACTORIES: dict[str, Factory] = {}
_DISPLAY_NAMES: dict[str, str] = {}


def normalise_name(name: str) -> str:
    """The registry key of ``name``: lower case with ``-`` and ``_`` removed."""
    return name.strip().lower().replace("-", "").replace("_", "")


def register_backbone(name: str) -> Callable[[F], F]:
    """Decorator registering a factory ``(**kwargs) -> nn.Module`` under ``name``.

    Raises:
        ValueError: if another factory already uses a name that normalises the same way.
    """
    key = normalise_name(name)
    if not key:
        raise ValueError(f"backbone name {name!r} is empty after normalisation")

    def decorator(factory: F) -> F:
        if key in _FACTORIES and _FACTORIES[key] is not factory:
            raise ValueError(
                f"backbone name {name!r} clashes with the registered {_DISPLAY_NAMES[key]!r}"
            )
        _FACTORIES[key] = factory
        _DISPLAY_NAMES[key] = name
        return factory

    return decorator


def backbone_names() -> list[str]:
    """The registered backbone names, as they were registered, sorted."""
    return sorted(_DISPLAY_NAMES.values())


def canonical_name(name: str) -> str:
    """The registered spelling of ``name`` (e.g. ``"iResNet-100"`` -> ``"iresnet100"``).

    Raises:
        ValueError: if no backbone of that name is registered; the message lists them all.
    """
    key = normalise_name(name)
    if key not in _FACTORIES:
        raise ValueError(
            f"unknown backbone {name!r}; available backbones: {', '.join(backbone_names())}"
            " (names ignore case, '-' and '_'; did you import qmag_ray.model?)"
        )
    return _DISPLAY_NAMES[key]


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name``; ``kwargs`` go to its factory.

    Raises:
        ValueError: if the name is unknown (the message lists the available names).
    """
    return _FACTORIES[normalise_name(canonical_name(name))](**kwargs)
