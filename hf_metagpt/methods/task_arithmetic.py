"""Task arithmetic (Ilharco et al., ICLR 2023): θ0 + λ Σt wt τt — defined with its family in `gta.py`."""

from __future__ import annotations

from .gta import TaskArithmetic

__all__ = ["TaskArithmetic"]
