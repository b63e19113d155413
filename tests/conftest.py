"""Shared pytest fixtures: see tests/helpers.py for the building blocks."""
import pytest

from helpers import *  # noqa: F401,F403
