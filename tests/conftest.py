"""Shared pytest configuration.

Hypothesis profiles for the property-based suite (tests/test_conformance.py):

* ``ci`` (default): derandomized (the same examples on every run, so a red CI is reproducible
  locally with the same command), a fixed example budget, no deadline (shared CI cores make
  timings noisy), the failing example printed as a reproduction blob.
* ``nightly``: randomized and ten times the budget; select with ``--hypothesis-profile nightly``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# NOTE: --hypothesis-profile (hypothesis' pytest plugin) loads its profile after this file is imported
settings.load_profile("ci")
