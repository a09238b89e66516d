"""mergeme: merge dense expert LLMs into one Mixture-of-Experts model.

The core library holds every step (fetch, validate, merge, route-calibrate, evaluate,
register) as plain functions; orchestration lives outside it, in ``flows/`` and ``tasks/``.
"""

__version__ = "0.1.0"
