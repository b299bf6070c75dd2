"""Test-session settings shared by every test file."""

import logging

import pytest
from guidance_fixtures import probe_inputs, tiny_model

# Library loggers (diffusers, transformers) bind their handler to the stderr of the test that first used
# them; pytest closes that stream afterwards. Such a stale handler must not print a logging traceback into a
# later test's captured stderr, which the one-line-error tests read.
logging.raiseExceptions = False


@pytest.fixture(scope="module")
def model():
    """A tiny random Zero-1-to-3 (seed 0), shared by a module's tests."""
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def probe():
    """Fixed inputs for comparing two models' guided noise predictions."""
    return probe_inputs()

