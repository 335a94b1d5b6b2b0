"""``pyrank demo``: a tiny RL run on a generated task, then AlphaRL on its own checkpoints.

See :mod:`pyrank.demo.run`. Nothing here is imported by ``import pyrank``.
"""
from .run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
