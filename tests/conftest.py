import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
# .ci/run sets COLA_HYPOTHESIS_PROFILE=ci; the README's plain `pytest` gets "default"
settings.load_profile(os.environ.get("COLA_HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    profile = settings.get_current_profile_name()
    return f"hypothesis profile: {profile} (max_examples={settings.get_profile(profile).max_examples})"


@pytest.fixture(scope="module")
def pm():
    """A fresh plugin manager with the built-in plugins (entry points of this distribution)."""
    import cola

    return cola.PluginManager()
