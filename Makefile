# Two commands on a fresh machine:
#   make demo   # the main job
#   make test   # every test (CI runs this, after scripts/setup_vllm.sh for the vLLM tests)
.PHONY: setup setup-vllm demo test lint format bench clean

setup:
	scripts/setup.sh

# vLLM's CPU build in its own venv (.venv-vllm, Python 3.11) for the fleet backend's tests and benchmark
setup-vllm:
	scripts/setup_vllm.sh

demo: setup
	bash -c '. scripts/env.sh && scripts/loopback.sh python scripts/demo.py $(DEMO_ARGS)'

test: setup
	scripts/run_tests.sh $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

bench: setup
	bash -c '. scripts/env.sh && python benchmarks/bench_engine.py'

clean:
	rm -rf ros2_ws/build ros2_ws/install ros2_ws/log
