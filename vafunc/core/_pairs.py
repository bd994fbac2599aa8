"""``pair``: the one place an int-or-pair argument (kernel size, stride, padding, dilation) is
spelled out as two ints."""

from __future__ import annotations


def pair(v) -> tuple[int, int]:
    """``v`` as ``(h, w)``: an int is used for both axes, a sequence of two is taken as given."""
    return (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
