# The two commands a fresh machine needs (see README): `make run` and `make test`.
.PHONY: setup run test bench

setup:
	scripts/setup.sh

run: setup
	.venv/bin/personaplex-agent serve --config configs/demo.yaml

test:
	scripts/setup.sh --test
	scripts/run_tests.sh --durations=15 -rsR -n 2 --dist loadfile

bench: setup
	.venv/bin/python scripts/bench_engine.py
