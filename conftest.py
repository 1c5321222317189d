"""Test-wide settings: hypothesis profiles and the CUDA skip.

Profiles (choose with HYPOTHESIS_PROFILE):
- ``ci`` (used by ``make test``): few examples per property, no deadline;
- ``dev`` (the default): a moderate number;
- ``slow`` (``make test-all``): exhaustive runs.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=100, **_common)
settings.register_profile("slow", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# A user's estimator module: importing it registers an estimator process-wide, so only the
# test that needs it imports it (doctest collection would import it for every test).
collect_ignore = ["tests/_user_estimators.py"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
