"""Tools the model can call while generating (see engine.py): the calculator."""

from nanoctl.tools.calculator import use_calculator

__all__ = ["use_calculator"]
