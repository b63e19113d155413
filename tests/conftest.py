"""Shared pytest fixtures: see tests/helpers.py for the building blocks."""
import os
import shutil

import pytest

from helpers import *  # noqa: F401,F403


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _mounts_under(path):
    prefix = os.path.realpath(str(path)) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f
                if (line.split()[1] + "/").startswith(prefix)]


@pytest.fixture(autouse=True)
def _remove_tmp_path_of_passed_test(request, tmp_path):
    """The images of a passed test go at once: the suite writes gigabytes
    in all, and pytest 7.2 keeps three whole runs.  A failed test keeps its
    directory for a look; nothing is removed while something is mounted
    under it."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed and not _mounts_under(tmp_path):
        shutil.rmtree(str(tmp_path), ignore_errors=True)
