# Benchmarks and fuzzing (issue 7); included by the top Makefile.
#   make bench   every benchmark; results in bench/results.json, plot in
#                bench/results.png, tables on stdout (docs/bench.md)
#   make fuzz    every fuzz target for FUZZ_SECONDS each (from fresh seeds)
# Their tools are not dependencies of the package: installed here, pinned.

BENCH_TOOLS := 'matplotlib>=3.6,<4'
FUZZ_TOOLS  := 'atheris>=2.3,<3'
FUZZ_SECONDS ?= 30
BENCH_FLAGS ?= --record

.PHONY: bench fuzz bench-tools fuzz-tools

bench-tools: $(STAMP)
	@$(VPY) -c 'import matplotlib' 2>/dev/null || $(VPY) -m pip install -q $(BENCH_TOOLS)

fuzz-tools: $(STAMP)
	@$(VPY) -c 'import atheris' 2>/dev/null || $(VPY) -m pip install -q $(FUZZ_TOOLS)

bench: bench-tools
	mkdir -p bench/out
	$(VPY) bench/bench_broker.py $(BENCH_FLAGS)
	$(VPY) bench/bench_daemon.py $(BENCH_FLAGS)
	$(VPY) bench/bench_registry.py $(BENCH_FLAGS)
	$(VPY) bench/bench_memory.py $(BENCH_FLAGS)
	$(VPY) bench/bench_setup.py $(BENCH_FLAGS)
	$(VPY) bench/bench_copy.py $(BENCH_FLAGS)
	$(VPY) bench/bench_codec.py $(BENCH_FLAGS)
	$(VPY) bench/plot.py

fuzz: fuzz-tools
	$(VPY) fuzz/run_all.py --seconds $(FUZZ_SECONDS) --record
