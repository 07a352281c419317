# bt -- make | make test | make train | make bench | make reference | make debug | make sanitize | make fuzz | make resume-test | make repro-test
#       | make render-check
# Options: MARCH=x86-64-v3 (the compile target; native by default), NO_OMP=1 (no OpenMP), USE_CUDA=1 (bt through nvcc, with --device cuda; make test also runs
#          tests/test_kernels on the GPU). Without USE_CUDA nothing needs CUDA.
SHELL    := /bin/bash
CXX      ?= g++
CXXFLAGS ?= -O3
CXXFLAGS += -std=c++17 -Wall -Wextra
PYTHON   ?= /usr/bin/python3

# The same numbers on every machine: no contraction of a*b+c into an FMA behind our back (the
# code writes each FMA it wants explicitly), and no -ffast-math. Then the target only changes speed.
CXXFLAGS += -ffp-contract=off
# -march=$(MARCH) (native by default; MARCH=x86-64-v3 for any AVX2+FMA machine) when accepted
MARCH ?= native
ifeq ($(shell $(CXX) -march=$(MARCH) -x c++ -E /dev/null >/dev/null 2>&1 && echo ok),ok)
  CXXFLAGS += -march=$(MARCH)
  $(info ✓ -march=$(MARCH))
else
  $(info ✗ -march=$(MARCH) (not accepted by $(CXX)))
endif
# OpenMP unless NO_OMP=1
ifeq ($(NO_OMP),1)
  CXXFLAGS += -Wno-unknown-pragmas
  $(info ✗ OpenMP (NO_OMP=1))
else ifeq ($(shell echo 'int main(){}' | $(CXX) -fopenmp -x c++ - -o /dev/null >/dev/null 2>&1 && echo ok),ok)
  CXXFLAGS += -fopenmp
  $(info ✓ OpenMP)
else
  CXXFLAGS += -Wno-unknown-pragmas
  $(info ✗ OpenMP (compiler has no -fopenmp))
endif

# nvcc compiles the .cpp files as CUDA (-x cu); the host code gets the same -fopenmp, -march and -ffp-contract
NVCC      ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
NVCCFLAGS ?= -O3
NVCCFLAGS += -std=c++17 -x cu $(if $(filter -fopenmp,$(CXXFLAGS)),-Xcompiler -fopenmp) \
             $(if $(filter -march=$(MARCH),$(CXXFLAGS)),-Xcompiler -march=$(MARCH)) -Xcompiler -ffp-contract=off
TEST_BINS  = tests/test_bt tests/test_kernels
ifeq ($(USE_CUDA),1)
  TEST_BINS += tests/test_kernels_gpu
  BT_BUILD   = $(NVCC) $(NVCCFLAGS) -DUSE_CUDA
  $(info ✓ CUDA (USE_CUDA=1): bt through $(NVCC) with --device cuda; make test also runs the GPU tests)
else
  BT_BUILD   = $(CXX) $(CXXFLAGS)
  $(info ✗ CUDA (make USE_CUDA=1 for bt --device cuda))
endif

.PHONY: all test train reference debug sanitize fuzz resume-test repro-test render-check check-cuda bench clean deps FORCE
all: bt

# bt is rebuilt when the way to build it changes (make, then make USE_CUDA=1): the command line is
# kept in a stamp file (*.tmp is git-ignored)
bt-build.tmp: FORCE
	@echo '$(BT_BUILD)' | cmp -s - $@ || echo '$(BT_BUILD)' > $@

# bt.cpp is the model program; lab/lab.cpp includes it and adds the lab (experiment, probe, bench)
CORE_SRC = bt.cpp tensor.hpp io.hpp cli.hpp device.hpp tasks.hpp decode_batched.hpp
LAB_SRC  = lab/lab.cpp lab/svg.hpp lab/trace.cpp lab/claims.cpp lab/experiment.cpp lab/probe.cpp lab/bench.cpp

bt: $(CORE_SRC) $(LAB_SRC) kernels.cu bt-build.tmp
	$(BT_BUILD) -o $@ lab/lab.cpp

# doctest comes from Debian's doctest-dev; installed here when missing and we are root
deps:
	@if [ ! -f /usr/include/doctest/doctest.h ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing doctest-dev with apt"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq doctest-dev >/dev/null; \
	  else \
	    echo "doctest is missing: run  sudo apt-get install doctest-dev  (or make test as root)"; exit 1; \
	  fi; \
	fi

tests/test_bt: tests/test_bt.cpp tests/fuzz.cpp tests/pictures.cpp $(CORE_SRC) $(LAB_SRC) | deps
	$(CXX) $(CXXFLAGS) -o $@ tests/test_bt.cpp

# the kernels of kernels.cu against the CPU ops, and bt's device path (--device cuda) against its CPU
# path: on the CPU through tests/cuda_on_cpu.hpp (always), and on the GPU with USE_CUDA=1 (with no
# GPU present, that binary says so and passes)
tests/test_kernels: tests/test_kernels.cpp kernels.cu tests/cuda_on_cpu.hpp $(CORE_SRC) | deps
	$(CXX) $(CXXFLAGS) -o $@ tests/test_kernels.cpp

tests/test_kernels_gpu: tests/test_kernels.cpp kernels.cu $(CORE_SRC) | deps
	$(NVCC) $(NVCCFLAGS) -o $@ tests/test_kernels.cpp

test: deps $(TEST_BINS)
	@for t in $(TEST_BINS); do echo "== $$t"; ./$$t || exit 1; done

# every picture rendered by headless Chromium (Debian's chromium; .ci/run installs it): the committed
# results/ (every .svg, and trace pages) and one of each kind the code writes now (tests/pictures.cpp
# writes them with BT_PICTURES_OUT). Fails on an XML parse error or a blank image; the PNGs stay in
# $(RENDER_DIR)/png to look at.
RENDER_DIR ?= /tmp/bt-render
render-check: tests/test_bt
	@rm -rf $(RENDER_DIR) && mkdir -p $(RENDER_DIR)/fresh
	@BT_PICTURES_OUT=$(RENDER_DIR)/fresh ./tests/test_bt -tc='*pictures*' > $(RENDER_DIR)/test.log 2>&1 || { cat $(RENDER_DIR)/test.log; exit 1; }
	RENDER_OUT=$(RENDER_DIR)/png tests/render_check.sh results $(RENDER_DIR)/fresh

# CI: kernels.cu, bt with --device cuda, and the GPU tests must compile with nvcc (needs no GPU)
check-cuda: | deps
	$(NVCC) $(NVCCFLAGS) -c kernels.cu -o /dev/null
	$(NVCC) $(NVCCFLAGS) -DUSE_CUDA -c lab/lab.cpp -o /dev/null
	$(NVCC) $(NVCCFLAGS) -c tests/test_kernels.cpp -o /dev/null
	@echo "✓ kernels.cu, bt.cpp (bt --device cuda) and tests/test_kernels.cpp compile with $(NVCC)"

# the main job: a small but real experiment on add, the task where the arms differ most (see
# results/add/results.md). One seed at the experiment's size (d_model 64); v4 (a 450-step backbone,
# then vanilla+extra, bt frozen, pause 4 for 200 steps each) and v1 (vanilla, bt joint, 600 steps
# from scratch). Writes results/make-train/add/results.md and its plots (not the committed 3-seed
# results/add). Finished runs are kept, so an interrupted make train goes on where it stopped.
TRAIN_FLAGS ?= --task add --regime both --seeds 1 --arms bt,pause4,bt-joint --stage1 450 --stage2 200 --steps 600 \
               --d-model 64 --n 40 --results results/make-train
train: bt
	./bt experiment $(TRAIN_FLAGS)

# regenerate the PyTorch reference tensors (needs python3-torch: apt-get install python3-torch)
reference:
	$(PYTHON) tests/reference.py --out weights

# bt against PyTorch on this machine: Debian's python3-torch, and the current PyPI torch in a venv
# (.venv, made on first use: about 5 GB) eager and with torch.compile; then bt bench prints the table
BENCH_DIR ?= /tmp/bt-bench
VENV      ?= .venv
bench: bt
	@mkdir -p $(BENCH_DIR)
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "== PyTorch (Debian)"; $(PYTHON) tests/bench_torch.py > $(BENCH_DIR)/torch-debian.jsonl; \
	else echo "Debian's python3-torch is missing (apt-get install python3-torch libopenblas0-pthread): not measured"; \
	  rm -f $(BENCH_DIR)/torch-debian.jsonl; fi
	@if [ ! -x $(VENV)/bin/python ] || ! $(VENV)/bin/python -c "import torch" 2>/dev/null; then \
	  echo "== making $(VENV) with the PyPI torch"; \
	  $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q torch numpy || echo "PyPI torch could not be installed: not measured"; fi
	@if $(VENV)/bin/python -c "import torch" 2>/dev/null; then \
	  echo "== PyTorch (PyPI, eager and torch.compile)"; $(VENV)/bin/python tests/bench_torch.py --compile > $(BENCH_DIR)/torch-pypi.jsonl; \
	else rm -f $(BENCH_DIR)/torch-pypi.jsonl; fi
	@echo "== bt"
	./bt bench --torch $(BENCH_DIR)/torch-debian.jsonl,$(BENCH_DIR)/torch-pypi.jsonl | tee $(BENCH_DIR)/bench.txt

# single-threaded (no OpenMP), so gdb steps through one loop at a time
debug: CXXFLAGS := -std=c++17 -Wall -Wextra -Wno-unknown-pragmas -O0 -g -fsanitize=address,undefined -fno-omit-frame-pointer
debug: $(CORE_SRC) $(LAB_SRC)
	$(CXX) $(CXXFLAGS) -o bt_debug lab/lab.cpp
	@echo "built bt_debug (-O0 -g, ASan+UBSan, one thread): gdb --args ./bt_debug train --steps 2 --batch 2"

# the whole test suite under AddressSanitizer and UndefinedBehaviorSanitizer (-O1 keeps it quick)
sanitize: deps
	$(CXX) -std=c++17 -Wall -Wextra -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
	  $(filter -fopenmp -march=% -ffp-contract=%,$(CXXFLAGS)) -o tests/test_bt_san tests/test_bt.cpp
	UBSAN_OPTIONS=halt_on_error=1 ./tests/test_bt_san

# a run killed with SIGKILL midway, resumed with --resume, ends bitwise equal to one never killed
resume-test: bt
	tests/resume_kill.sh ./bt

# the same bytes from -march=native, x86-64-v3 and x86-64 (plain loops) builds at 1 and 2 threads: checkpoints,
# .state, bt eval and bt score of small vanilla, bt frozen (bptt full, step), joint and periodic runs.
# Builds its own two bt in a scratch folder with these flags (CPU only; ./bt is left alone)
repro-test:
	CXX='$(CXX)' CXXFLAGS_BASE='$(filter-out -march=%,$(CXXFLAGS))' tests/repro.sh

# libFuzzer (clang from Debian) on the checkpoint loader and the data-file parser, FUZZ_SECONDS each.
# New inputs go to a scratch corpus; an input that crashes is written to tests/fuzz/<target>/ so
# that make test replays it from then on.
FUZZ_SECONDS ?= 120
FUZZ_FLAGS = -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Wno-unknown-pragmas
fuzz: tests/fuzz.cpp $(CORE_SRC)
	@command -v clang++ >/dev/null || { echo "make fuzz needs clang: apt-get install clang"; exit 1; }
	clang++ $(FUZZ_FLAGS) -DFUZZ_CHECKPOINT -o tests/fuzz_checkpoint tests/fuzz.cpp
	clang++ $(FUZZ_FLAGS) -DFUZZ_DATA -o tests/fuzz_data tests/fuzz.cpp
	@for t in checkpoint data; do \
	  corpus=$$(mktemp -d); \
	  echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  ./tests/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -print_final_stats=1 \
	    -artifact_prefix=tests/fuzz/$$t/crash- $$corpus tests/fuzz/$$t 2>&1 | grep -E "^(stat::number_of_executed_units|stat::new_units_added|==[0-9]+==ERROR|SUMMARY|Done)" ; \
	  status=$${PIPESTATUS[0]}; rm -rf $$corpus; \
	  [ $$status = 0 ] || { echo "fuzz_$$t found a crash: the input is in tests/fuzz/$$t/"; exit 1; }; \
	done

clean:
	rm -f bt bt_debug bt-build.tmp tests/test_bt tests/test_bt_san tests/fuzz_checkpoint tests/fuzz_data tests/test_kernels \
	  tests/test_kernels_gpu
