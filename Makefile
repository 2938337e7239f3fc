.PHONY: install test test-all lint bench

install:
	pip install "torch==2.13.0" -e ".[dev]"

test:
	python -m pytest

test-all:
	python -m pytest -m ""

lint:
	ruff check . && ruff format --check . && mypy

bench:
	python benchmarks/population_update.py
	python benchmarks/rollout.py
	python benchmarks/ray_rollout.py
	python benchmarks/learning.py
