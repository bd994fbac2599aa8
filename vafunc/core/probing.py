"""Scopes that record what a family declares, for the probes that read a declaration on the meta
device (which blocks ``remat`` can recompute, which linear layers LoRA can adapt)."""

from __future__ import annotations

__all__ = ["Recording"]


class Recording:
    """A mixin for a :class:`~vafunc.core.kit.Scope` subclass whose children are of that subclass too,
    so an override (``linear``, ``block``, ...) sees every layer of the family, not only the top
    scope's: ``class Recorder(Recording, Scope): def linear(self, ...): ...``."""

    __slots__ = ()

    def child(self, name, rng=None, *, module=None):
        c = super().child(name, rng, module=module)
        r = object.__new__(type(self))
        for klass in type(c).__mro__:  # the child's state, slot by slot (scopes have no __dict__)
            for slot in getattr(klass, "__slots__", ()):
                setattr(r, slot, getattr(c, slot))
        return r
