"""Test configuration: the tests directory on ``sys.path`` (helpers such as
``battery``, ``oracle``, ``models`` and ``harness`` are imported by name),
and hypothesis profiles. Shared helpers are imported by name, not
passed as fixtures (``from harness import run_steps``).

Hypothesis profiles (pick one with ``HYPOTHESIS_PROFILE``): ``ci``, the
default (no deadline, at most 50 examples per test unless the test asks for
another number), and ``thorough`` (1000 examples). The per-test time limit
is ``timeout`` in ``[tool.pytest.ini_options]`` of pyproject.toml.
"""

import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", deadline=None, max_examples=50, suppress_health_check=_SUPPRESS,
                          print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=1000,
                          suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# A worker script that test_multiprocess.py starts with arguments, not a test
# module (--doctest-modules would import it).
collect_ignore = ["multiprocess_child.py"]
