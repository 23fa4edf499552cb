"""Vision-side baselines from other papers, each in its own module, registered with ``register_vision_method`` when
imported (``pruning/__init__.py`` imports this package). Each module's docstring names the official repository and
the commit followed; docs/baselines.md has the equations and every deviation.
"""

from pruning.baselines import divprune, pool, prumerge, recovery, tome, visionzip  # noqa: F401  (registers the methods)
