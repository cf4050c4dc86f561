# make demo: the whole pipeline offline on bundled synthetic images and tiny trained models.  make test: the test suite + lint.
# Both create .venv and install requirements*.txt on first use; nothing else is needed beyond Python 3.10+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements*.txt | cksum | cut -d' ' -f1)
TINY := models/tiny
# pytest workers: both cores by default; PYTEST_WORKERS=0 runs in one process
PYTEST_WORKERS ?= 2

.PHONY: demo demo-photos test lint format tiny clean-demo

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	@# DeepSpeed builds from source: without build isolation (isolation would pull a multi-GB torch) and
	@# without compiling its CUDA ops (they are built at run time on GPU machines). Without a GPU its CPU
	@# shared-memory op is compiled now: the first ZeRO run on CPU otherwise compiles it (a minute alone,
	@# two beside the tests).
	@if [ -f requirements-deepspeed.txt ]; then \
		shm=$$(command -v nvidia-smi >/dev/null 2>&1 && echo 0 || echo 1); \
		DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=$$shm $(BIN)/python -m pip install -q --no-cache-dir \
			--no-build-isolation -r requirements-deepspeed.txt; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

$(TINY)/.built: $(STAMP) capdpo/models/tiny.py
	$(BIN)/python -m capdpo tiny --out $(TINY) --force
	@touch $@

tiny: $(TINY)/.built

demo: $(STAMP)
	@echo "capdpo demo: the synthetic world (bundled images of coloured shapes whose content is known) and two tiny"
	@echo "models trained on it (models/synthetic/): a strong describer with a planted bias, a weak verifier."
	bash scripts/run_all.sh configs/synthetic_demo.yaml
	$(BIN)/python -m capdpo data-report --run_dir runs/synthetic_demo
	$(BIN)/python -m capdpo truth-report --run_dir runs/synthetic_demo
	@echo "Demo done: outputs in runs/synthetic_demo/ (open runs/synthetic_demo/05_report.html)."

# The same pipeline on the bundled photos with tiny RANDOM-weight models: the files and mechanics of a run on real
# photos; the text is meaningless by design.
demo-photos: $(STAMP) $(TINY)/.built
	bash scripts/run_all.sh configs/demo.yaml
	$(BIN)/python -m capdpo data-report --run_dir runs/demo
	@echo "Done: outputs in runs/demo/ (open runs/demo/05_report.html). Random tiny models: meaningless text."

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-demo:
	rm -rf runs/demo runs/synthetic_demo
