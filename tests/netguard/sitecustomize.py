"""Loaded at start-up by every Python process the tests start (tests/conftest.py puts this folder on
PYTHONPATH): installs the network guard in it."""

import netguard  # noqa: F401  (installs itself when $IMAGEBROKER_NETGUARD_LOG is set)
