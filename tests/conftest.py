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
    spread over every worker, test by test. The longest units (:data:`FIRST`) are handed out first, so that no worker
    starts one of them when the other is nearly done."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPREAD_MODULES else module

        def _assign_work_unit(self, node) -> None:
            first = next((unit for unit in FIRST if unit in self.workqueue), None)
            if first is not None:
                self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return ByModule(config, log)


#: modules whose tests are independent of each other and long in all (a module fixture of theirs, if any, costs a
#: second or two per worker): spread over the workers test by test
SPREAD_MODULES = {"tests/test_docs.py", "tests/llm/test_faults.py", "tests/test_benchmarks_smoke.py"}
#: the units (modules, or tests of SPREAD_MODULES) of 10 s or more, longest first (`--durations`; docs/testing.md): they
#: start before the rest (which goes by number of tests, xdist's order). A test that starts processes belongs here.
FIRST = ("tests/llm/test_llm_distributed.py", "tests/llm/test_performance.py", "tests/test_distributed.py",
         "tests/llm/test_facts_recipes.py",
         "tests/llm/test_faults.py::test_sigterm_and_sigint_at_random_steps_and_in_a_knot_then_resume",
         "tests/llm/test_faults.py::test_sigterm_to_one_rank_under_torchrun_stops_every_rank_after_the_same_step",
         "tests/llm/test_sweep.py",
         "tests/llm/test_faults.py::test_two_processes_on_one_folder_exactly_one_runs",
         "tests/llm/test_corpus_train.py", "tests/llm/test_peft_trainers.py", "tests/theory/test_theory_bounds.py")


def pytest_report_header(config):
    profile = settings.get_current_profile_name()
    return f"hypothesis profile: {profile} (max_examples={settings.get_profile(profile).max_examples})"


@pytest.fixture(scope="module")
def pm():
    """A fresh plugin manager with the built-in plugins (entry points of this distribution)."""
    import cola

    return cola.PluginManager()
