"""Test-session settings shared by every test file."""

import logging

# Library loggers (diffusers, transformers) bind their handler to the stderr of the test that first used
# them; pytest closes that stream afterwards. Such a stale handler must not print a logging traceback into a
# later test's captured stderr, which the one-line-error tests read.
logging.raiseExceptions = False
