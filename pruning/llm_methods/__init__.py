"""LLM-side baselines from other papers (``--llm-pruning``), each in its own module, registered with
``register_llm_method`` when imported (``pruning/__init__.py`` imports this package). Each module's docstring names
the official repository and the commit followed; docs/baselines.md has the equations and every deviation.
``schedule`` (per-layer schedules, G-Search / P-Sigmoid) is documented in docs/schedules.md.
"""

from pruning.llm_methods import dart, fastv, pdrop, schedule  # noqa: F401  (registers the methods)
