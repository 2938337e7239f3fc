"""Small environments for tests, importable as ``custom_envs.toy:ClassName`` with ``tests/`` on the path."""
