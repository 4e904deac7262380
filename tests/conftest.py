"""Shared pytest configuration.

Hypothesis profiles for the property-based suite (tests/test_conformance.py):

* ``ci`` (default): derandomized (the same examples on every run, so a red CI is reproducible
  locally with the same command), a fixed example budget, no deadline (shared CI cores make
  timings noisy), the failing example printed as a reproduction blob.
* ``nightly``: randomized and ten times the budget; select with ``--hypothesis-profile nightly``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from datamodules import fashion_mnist as fm

from helpers import HAVE_FMNIST, ROOT

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


# ---------------------------------------------------------------------------- shared fixtures
# Paths, the Fashion-MNIST task's arguments and the small datasets live in tests/helpers.py
# (importable: ``from helpers import ROOT, fmnist_args, needs_fmnist``); the fixtures below wrap
# them for tests that take them as arguments. Markers (pyproject.toml): ``slow`` for the tests
# that train end to end or run a whole benchmark script (``pytest -m "not slow"`` is the quick
# loop), ``cuda``.


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (configs/, benchmarks/, ...)."""
    return ROOT


@pytest.fixture
def fmnist_data() -> Path:
    """Fashion-MNIST's folder; skips the test where the Debian dataset is not installed."""
    if not HAVE_FMNIST:
        pytest.skip("needs `apt-get install dataset-fashion-mnist` (make test does it)")
    return fm.DEBIAN_ROOT
