import os
import sys

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set (as some images do): else every worker of every run
# compiles the sources and rewrites the test modules' asserts again, about 5 s a worker (__pycache__ is git-ignored).
sys.dont_write_bytecode = False

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
# .ci/run sets COLA_HYPOTHESIS_PROFILE=ci; the README's plain `pytest` gets "default"
settings.load_profile(os.environ.get("COLA_HYPOTHESIS_PROFILE", "default"))

if os.environ.get("PYTEST_XDIST_WORKER"):   # one of the README's test command's workers: one core each
    os.environ["OMP_NUM_THREADS"] = "1"      # and its subprocesses (cola train, torchrun ranks)
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_xdist_make_scheduler(config, log):
    """The README's test command's workers (-n auto): each test module runs on one worker (its module fixtures, the
    torchrun launches among them, are set up once), except the long modules of independent tests with cheap
    fixtures (the docs' commands and transcripts, the machine's faults, the benchmarks' smoke runs): they are
    spread over every worker, test by test."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPREAD_MODULES else module

    return ByModule(config, log)


#: modules whose tests are independent of each other and long in all (a module fixture of theirs, if any, costs a
#: second or two per worker): spread over the workers test by test
SPREAD_MODULES = {"tests/test_docs.py", "tests/llm/test_faults.py", "tests/test_benchmarks_smoke.py"}


def pytest_report_header(config):
    profile = settings.get_current_profile_name()
    return f"hypothesis profile: {profile} (max_examples={settings.get_profile(profile).max_examples})"


@pytest.fixture(scope="module")
def pm():
    """A fresh plugin manager with the built-in plugins (entry points of this distribution)."""
    import cola

    return cola.PluginManager()
