"""Contract tests against the RL frameworks' own code (a package, so its conftest does not shadow tests/conftest.py)."""
