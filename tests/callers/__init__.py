"""Contract tests against the RL frameworks' own code.

A package, so that its conftest does not shadow tests/conftest.py."""
