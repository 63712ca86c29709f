"""Formatting shared by the experiment scripts: markdown table rows, number formats, strict-ish JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def md_head(cols: Sequence[str]) -> str:
    """A markdown table header with its separator line."""
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def md_row(cells: Sequence[Any]) -> str:
    """One markdown table row (cells through ``str``)."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt_d(d: int) -> str:
    """A dimension as ``1e5`` / ``4e6``."""
    exp = math.floor(math.log10(d))
    mant = d / 10**exp
    return f"1e{exp}" if mant == 1 else f"{mant:g}e{exp}"


def fmt_x(ratio: float | None, digits: int = 2) -> str:
    """A ratio as ``1.23x`` (``-`` when missing or not finite)."""
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.{digits}f}x"


def fmt_e(err: float | None) -> str:
    """A relative error as ``1.2e-06`` (``-`` when missing, ``fail`` when not finite)."""
    if err is None:
        return "-"
    if not math.isfinite(err):
        return "fail"
    return f"{err:.1e}"


def jsonable(obj: Any) -> Any:
    """Nested dicts/lists/tuples with string keys; NaN -> ``None``, +-inf -> ``"inf"``/``"-inf"``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj
