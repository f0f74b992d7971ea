# libklvae — one entry point for building, testing and installing.
#
#   make              library (lib/), CLI (bin/klvae), C examples (build/examples/)
#   make demo         trains on procedural images for 3 minutes (demo-run/): the small
#                     config on the CPU, the SD config at 256x256 where a GPU answers
#   make check        the test suite (Check), then the CLI, install, fault and binding tests
#                     (both install what is missing first, once: tools/deps.sh)
#   make check-asan   the same suite under AddressSanitizer and UBSan
#   make fuzz         builds the libFuzzer harnesses of tests/fuzz/ (clang) and runs each
#                     for FUZZ_SECONDS (default 60; FUZZ_SECONDS=0 only builds)
#   make abi-check    the ABI of lib/libklvae.so against tests/abi/ (abigail-tools)
#   make install      PREFIX=/usr/local DESTDIR= (GNU conventions)
#   make deps         installs the Debian packages the build and tests need (tools/deps.sh)
#   make bench        times encode/decode, a training step and a dataset encode against
#                     PyTorch (tools/bench.py)
#   make parity       compares the full SD config with diffusers (needs PyTorch)
#   make fixtures     regenerates tests/fixtures with diffusers (needs PyTorch)

VERSION_MAJOR := $(shell sed -n 's/^\#define KLVAE_VERSION_MAJOR \([0-9]*\)/\1/p' include/klvae.h)
VERSION_MINOR := $(shell sed -n 's/^\#define KLVAE_VERSION_MINOR \([0-9]*\)/\1/p' include/klvae.h)
VERSION_PATCH := $(shell sed -n 's/^\#define KLVAE_VERSION_PATCH \([0-9]*\)/\1/p' include/klvae.h)
VERSION := $(VERSION_MAJOR).$(VERSION_MINOR).$(VERSION_PATCH)

PREFIX ?= /usr/local
prefix ?= $(PREFIX)
exec_prefix ?= $(prefix)
BINDIR ?= $(exec_prefix)/bin
LIBDIR ?= $(exec_prefix)/lib
INCLUDEDIR ?= $(prefix)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
MANDIR ?= $(prefix)/share/man

CC ?= cc
PKG_CONFIG ?= pkg-config
CFLAGS ?= -O2 -g
# Dependencies: a CBLAS (OpenBLAS), jansson, libpng, libjpeg.
DEP_PACKAGES := openblas jansson libpng libjpeg
DEP_CFLAGS := $(shell $(PKG_CONFIG) --cflags $(DEP_PACKAGES) 2>/dev/null)
DEP_LIBS := $(shell $(PKG_CONFIG) --libs $(DEP_PACKAGES) 2>/dev/null || echo -lopenblas -ljansson -lpng16 -ljpeg)
# The README's two commands work on a fresh machine: `make demo` and the
# check targets first run tools/deps.sh (it installs what is missing, or says
# what to install and stops), once: build/deps.stamp records that it passed.
# GNU make remakes an included makefile first and then starts again, so the
# pkg-config flags above are read after the install. KLVAE_NO_DEPS=1 skips it.
DEPS_GOALS := demo check check-unit check-asan check-python check-rust abi-check bench
.DEFAULT_GOAL := all
ifneq ($(KLVAE_NO_DEPS),1)
ifneq ($(filter $(DEPS_GOALS),$(MAKECMDGOALS)),)
include build/deps.stamp
endif
endif
build/deps.stamp: tools/deps.sh
	@sh tools/deps.sh
	@mkdir -p build && echo "# tools/deps.sh passed" > $@
ifeq ($(filter $(DEPS_GOALS) deps clean uninstall,$(MAKECMDGOALS)),)
ifneq ($(shell $(PKG_CONFIG) --exists $(DEP_PACKAGES) 2>/dev/null && echo found),found)
$(warning pkg-config does not find $(DEP_PACKAGES): 'make deps' installs them (make demo and make check do it by themselves))
endif
endif
# -ffp-contract=off: the Philox sampler must round exactly as the CUDA one does.
KV_CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -fPIC -fvisibility=hidden -ffp-contract=off \
             -pthread -Iinclude -Isrc $(DEP_CFLAGS)
SYS_LIBS := -lm -lpthread -ldl

# The library's layers, bottom up (docs/design.md): each includes only from
# the layers before it (tests/layers_test.sh checks).
LAYERS := base formats backend model train dataset
LIB_SOURCES := $(foreach l,$(LAYERS),$(wildcard src/$(l)/*.c)) $(wildcard src/backend/cpu/*.c)
LIB_HEADERS := $(wildcard src/*/*.h src/*/*/*.h include/*.h)
LIB_OBJECTS := $(patsubst src/%.c,build/obj/%.o,$(LIB_SOURCES))
# MPI for `klvae train` under mpirun (src/cli/team.c; the library links none):
# with Open MPI's mpicc found, bin/klvae is built with it. MPICC= (empty)
# builds without; MPI_CFLAGS and MPI_LIBS override what mpicc reports.
MPICC ?= $(shell command -v mpicc 2>/dev/null)
MPI_CFLAGS ?= $(if $(MPICC),$(shell $(MPICC) --showme:compile 2>/dev/null))
MPI_LIBS ?= $(if $(MPICC),$(shell $(MPICC) --showme:link 2>/dev/null))
MPI_FOUND := $(if $(and $(MPICC),$(MPI_LIBS)),yes)
# cli/team.c is compiled into team_mpi.o or team_nompi.o, so that the tool is
# relinked when MPI appears (or goes)
TEAM_OBJECT := build/obj/cli/team_$(if $(MPI_FOUND),mpi,nompi).o
CLI_SOURCES := $(wildcard src/cli/*.c)
CLI_OBJECTS := $(filter-out build/obj/cli/team.o,$(patsubst src/%.c,build/obj/%.o,$(CLI_SOURCES))) \
               $(TEAM_OBJECT)
# the tool's pieces without its main(), which the unit tests link too, with
# cli/team.c built without MPI, so that they need no MPI
CLI_PARTS := $(filter-out build/obj/cli/klvae.o $(TEAM_OBJECT),$(CLI_OBJECTS)) \
             build/obj/cli/team_nompi.o
EXAMPLES := $(patsubst examples/c/%.c,build/examples/%,$(wildcard examples/c/*.c))
# tests/ops/: one file per op family (test_FAMILY.c) and their shared helpers;
# their objects go to build/tests/ops/, so names stay unique.
TEST_SOURCES := $(wildcard tests/*.c tests/ops/*.c)
TEST_OBJECTS := $(patsubst tests/%.c,build/tests/%.o,$(TEST_SOURCES))
TEST_HEADERS := tests/test_util.h $(wildcard tests/ops/*.h)

SHARED := lib/libklvae.so.$(VERSION)
SONAME := libklvae.so.$(VERSION_MAJOR)
STATIC := lib/libklvae.a
CLI := bin/klvae
TEST_BIN := build/tests/check_klvae

.PHONY: all lib examples check check-unit check-asan check-python check-rust install uninstall clean deps bench demo \
        parity fixtures

all: lib $(CLI) examples build/klvae-uninstalled.pc

lib: $(SHARED) lib/$(SONAME) lib/libklvae.so $(STATIC)

build/obj/%.o: src/%.c $(LIB_HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) $(CFLAGS) -c $< -o $@

# The CPU ops are streaming loops: let the vectoriser take every loop it can
# (GCC's -O2 only takes loops that need no remainder or alias checks, and
# -fno-trapping-math lets it turn float comparisons into selects).
build/obj/backend/cpu/%.o: src/backend/cpu/%.c $(LIB_HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) $(CFLAGS) -ftree-vectorize -fvect-cost-model=dynamic -fno-trapping-math -c $< -o $@

$(SHARED): $(LIB_OBJECTS) src/libklvae.map
	@mkdir -p lib
	$(CC) -shared -o $@ $(LIB_OBJECTS) -Wl,-soname,$(SONAME) \
	    -Wl,--version-script=src/libklvae.map -Wl,--no-undefined $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

lib/$(SONAME): $(SHARED)
	ln -sf $(notdir $(SHARED)) $@

lib/libklvae.so: lib/$(SONAME)
	ln -sf $(SONAME) $@

$(STATIC): $(LIB_OBJECTS)
	@mkdir -p lib
	rm -f $@
	ar rcs $@ $(LIB_OBJECTS)

# The CLI links the static library: besides the API it uses the library's
# safetensors code for latent files, which the shared library keeps hidden.
build/obj/cli/%.o: src/cli/%.c $(LIB_HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) $(CFLAGS) -c $< -o $@

build/obj/cli/team_mpi.o: src/cli/team.c $(LIB_HEADERS) src/cli/team.h
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) $(CFLAGS) -DKV_WITH_MPI $(MPI_CFLAGS) -c $< -o $@

build/obj/cli/team_nompi.o: src/cli/team.c $(LIB_HEADERS) src/cli/team.h
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) $(CFLAGS) -c $< -o $@

$(CLI): $(CLI_OBJECTS) $(STATIC)
	@mkdir -p bin
	$(CC) -o $@ $(CLI_OBJECTS) $(STATIC) $(LDFLAGS) $(if $(MPI_FOUND),$(MPI_LIBS)) $(DEP_LIBS) \
	    $(SYS_LIBS)

# The tool built without MPI whatever this machine has (tests/mpi_test.sh:
# under mpirun it must refuse to train N independent copies).
build/tests/klvae_nompi: build/obj/cli/klvae.o $(CLI_PARTS) $(STATIC)
	@mkdir -p build/tests
	$(CC) -o $@ build/obj/cli/klvae.o $(CLI_PARTS) $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

# The MPI example (examples/mpi/), with mpicc against lib/, when MPI is here.
MPI_EXAMPLES := $(if $(MPI_FOUND),$(patsubst examples/mpi/%.c,build/examples/mpi/%,$(wildcard examples/mpi/*.c)))
examples: $(MPI_EXAMPLES)
build/examples/mpi/%: examples/mpi/%.c lib/libklvae.so include/klvae.h
	@mkdir -p build/examples/mpi
	$(MPICC) -std=c11 -Wall -Wextra $(CFLAGS) -Iinclude $< -o $@ -Llib -lklvae \
	    -Wl,-rpath,'$$ORIGIN/../../../lib' -lm

# tools/bench_dp.sh's program: data-parallel step times (docs/performance.md).
build/bench_dp: tools/bench_dp.c lib/libklvae.so include/klvae.h
	@[ -n "$(MPI_FOUND)" ] || { echo "build/bench_dp needs Open MPI's mpicc (make deps)" >&2; exit 1; }
	$(MPICC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -O2 -Iinclude $< -o $@ -Llib -lklvae \
	    -Wl,-rpath,'$$ORIGIN/../lib' -lm

# tests/mpi_test.sh's helper: compares checkpoints, writes test images.
build/tests/mpi_tool: tests/mpi/mpi_tool.c $(STATIC) $(LIB_HEADERS)
	@mkdir -p build/tests
	$(CC) $(KV_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

.PHONY: mpi-note
all: mpi-note
mpi-note:
	@$(if $(MPI_FOUND),true,echo "klvae train: built without MPI (mpicc not found; apt-get install libopenmpi-dev openmpi-bin, or make deps); mpirun -np N klvae train needs it")

examples: $(EXAMPLES)

build/examples/%: examples/c/%.c lib/libklvae.so include/klvae.h
	@mkdir -p build/examples
	$(CC) -std=c11 -Wall -Wextra $(CFLAGS) -Iinclude $< -o $@ -Llib -lklvae \
	    -Wl,-rpath,'$$ORIGIN/../../lib' -lm

# The C++ examples (examples/cpp/*.cpp, with the header-only wrapper klvae.hpp)
# go to build/examples/cpp/.
CXXFLAGS ?= -O2 -g
CPP_EXAMPLES := $(patsubst examples/cpp/%.cpp,build/examples/cpp/%,$(wildcard examples/cpp/*.cpp))
examples: $(CPP_EXAMPLES)

build/examples/cpp/%: examples/cpp/%.cpp examples/cpp/klvae.hpp lib/libklvae.so include/klvae.h
	@mkdir -p build/examples/cpp
	$(CXX) -std=c++17 -Wall -Wextra -Wpedantic $(CXXFLAGS) -Iinclude -Iexamples/cpp $< -o $@ \
	    -Llib -lklvae -Wl,-rpath,'$$ORIGIN/../../../lib'

build/klvae-uninstalled.pc: pkgconfig/klvae-uninstalled.pc.in include/klvae.h
	@mkdir -p build
	sed -e 's|@TOP@|$(CURDIR)|' -e 's|@VERSION@|$(VERSION)|' $< > $@

# ---- tests ----

CHECK_CFLAGS := $(shell $(PKG_CONFIG) --cflags check 2>/dev/null)
CHECK_LIBS := $(shell $(PKG_CONFIG) --libs check 2>/dev/null || echo -lcheck -lsubunit -lrt -lm)

# -Itests: the files of tests/ops/ include test_util.h by name.
build/tests/%.o: tests/%.c $(TEST_HEADERS) $(LIB_HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) -Itests $(CHECK_CFLAGS) $(CFLAGS) -c $< -o $@

# Stand-ins for the CUDA plugin that tests/test_plugin.c loads, one per mode.
FAKE_PLUGINS := $(patsubst %,build/tests/plugins/fake_%.so,working no_entry bad_abi no_driver create_oom incomplete)
build/tests/plugins/fake_%.so: tests/plugins/fake_plugin.c tests/plugins/fake_plugin.h $(LIB_HEADERS)
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -Wall -Wextra -O1 -g -fPIC -shared -fvisibility=hidden -Iinclude -Isrc -DFAKE_MODE_$* $< -o $@

# The tests link the static library so that they can reach internal ops.
$(TEST_BIN): $(TEST_OBJECTS) $(CLI_PARTS) $(STATIC) | $(FAKE_PLUGINS)
	$(CC) -o $@ $(TEST_OBJECTS) $(CLI_PARTS) $(STATIC) $(LDFLAGS) $(CHECK_LIBS) $(DEP_LIBS) $(SYS_LIBS)

check-unit: $(TEST_BIN)
	cd tests && ../$(TEST_BIN)

check: all $(TEST_BIN) build/tests/mpi_tool build/tests/klvae_nompi
	@status=0; \
	(cd tests && ../$(TEST_BIN)) || status=1; \
	sh tests/layers_test.sh || status=1; \
	sh tests/ops_layout_test.sh || status=1; \
	sh tests/cli_test.sh || status=1; \
	sh tests/mpi_test.sh || status=1; \
	sh tests/install_test.sh || status=1; \
	sh tests/fault_test.sh || status=1; \
	sh tests/encode_dataset_test.sh || status=1; \
	sh tests/docs_test.sh || status=1; \
	sh tests/bindings_test.sh || status=1; \
	exit $$status

# Records the outputs tests/test_golden.c compares with (only for a change
# that is meant to change results; say so in its commit).
.PHONY: golden-record
golden-record: $(TEST_BIN)
	cd tests && KLVAE_GOLDEN_RECORD=fixtures/golden/outputs.safetensors CK_RUN_SUITE=golden \
	    CK_FORK=no ../$(TEST_BIN)

# One binding at a time (tests/bindings_test.sh runs both).
PYTHON ?= python3
check-python: lib
	PYTHONPATH=$(CURDIR)/build/pydeps$${PYTHONPATH:+:$$PYTHONPATH} \
	    KLVAE_LIBRARY=$(CURDIR)/lib/$(SONAME) $(PYTHON) -m pytest -q examples/python/tests
check-rust: lib build/klvae-uninstalled.pc
	cd examples/rust && PKG_CONFIG_PATH=$(CURDIR)/build CARGO_TARGET_DIR=$(CURDIR)/build/rust \
	    cargo test --offline

ASAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
check-asan:
	$(MAKE) clean-objects
	$(MAKE) CFLAGS="$(ASAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(TEST_BIN)
	cd tests && ASAN_OPTIONS=detect_leaks=1 CK_FORK=no ../$(TEST_BIN); \
	status=$$?; cd .. && $(MAKE) clean-objects; exit $$status

.PHONY: clean-objects
clean-objects:
	rm -rf build/obj build/tests lib/*.so* lib/*.a bin/klvae

# ---- ABI ----

# tests/abi/$(SONAME).abi is the ABI this soname promises, as abidw
# (abigail-tools) reads it from the DWARF of the -g build: the exported
# symbols with their version node, the public types and the functions'
# signatures. abi-check compares a fresh description of lib/ with it and fails
# on any difference; abi-baseline accepts the current ABI (docs/abi.md says
# when that is right). The flags keep out what differs between machines and
# build folders: paths, architecture, DT_NEEDED, parameter names.
ABI_BASELINE := tests/abi/$(SONAME).abi
ABIDW_FLAGS := --headers-dir include --drop-private-types --drop-undefined-syms \
               --no-corpus-path --no-comp-dir-path --no-show-locs --no-elf-needed \
               --no-architecture --no-parameter-names --type-id-style hash
ABI_TOOLS = command -v abidw >/dev/null && command -v abidiff >/dev/null || \
    { echo "$@ needs abidw and abidiff: apt-get install abigail-tools" >&2; exit 1; }; \
    readelf -S $(SHARED) | grep -q '\.debug_info' || \
    { echo "$@: $(SHARED) has no debug info; build it with -g in CFLAGS" >&2; exit 1; }
.PHONY: abi-check abi-baseline

abi-check: $(SHARED)
	@$(ABI_TOOLS)
	@[ -f $(ABI_BASELINE) ] || { echo "abi-check: no baseline $(ABI_BASELINE) for soname" \
	    "$(SONAME); 'make abi-baseline' makes it (docs/abi.md)" >&2; exit 1; }
	@mkdir -p build/abi
	abidw $(ABIDW_FLAGS) --out-file build/abi/$(SONAME).abi $(SHARED)
	@status=0; abidiff --no-architecture --harmless $(ABI_BASELINE) build/abi/$(SONAME).abi || status=$$?; \
	if [ $$status -eq 0 ]; then echo "abi-check: $(SHARED) has the ABI of $(ABI_BASELINE)"; \
	elif [ $$((status & 3)) -ne 0 ]; then echo "abi-check: abidiff failed (exit status $$status)" >&2; \
	else \
	    what="changed"; [ $$((status & 8)) -eq 0 ] || what="changed INCOMPATIBLY"; \
	    echo "" >&2; \
	    echo "abi-check: the ABI of $(SHARED) $$what against $(ABI_BASELINE)" \
	         "(abidiff exit status $$status, report above)." >&2; \
	    echo "If the change is intended: added functions need a minor version bump and a new" >&2; \
	    echo "node in src/libklvae.map; changed or removed ones a major bump (new soname)." >&2; \
	    echo "Then run 'make abi-baseline' and commit $(ABI_BASELINE) with the change" >&2; \
	    echo "(docs/abi.md). Otherwise undo the change." >&2; \
	fi; exit $$status

abi-baseline: $(SHARED)
	@$(ABI_TOOLS)
	@mkdir -p tests/abi
	abidw $(ABIDW_FLAGS) --out-file $(ABI_BASELINE) $(SHARED)
	@echo "wrote $(ABI_BASELINE): commit it with the change it records (docs/abi.md)"

# ---- install ----

install: lib $(CLI)
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(BINDIR) \
	    $(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(SHARED) $(DESTDIR)$(LIBDIR)/
	ln -sf $(notdir $(SHARED)) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libklvae.so
	install -m 644 $(STATIC) $(DESTDIR)$(LIBDIR)/
	install -m 644 include/klvae.h $(DESTDIR)$(INCLUDEDIR)/
	install -m 755 $(CLI) $(DESTDIR)$(BINDIR)/
	install -m 644 docs/klvae.1 $(DESTDIR)$(MANDIR)/man1/
	sed -e 's|@PREFIX@|$(prefix)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    -e 's|@REQUIRES_PRIVATE@|$(DEP_PACKAGES)|' -e 's|@LIBS_PRIVATE@|$(SYS_LIBS)|' \
	    pkgconfig/klvae.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/klvae.pc
	@if [ -z "$(DESTDIR)" ] && command -v ldconfig >/dev/null 2>&1 && [ -w /etc/ld.so.cache ]; then ldconfig; fi

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/$(notdir $(SHARED)) $(DESTDIR)$(LIBDIR)/$(SONAME) \
	    $(DESTDIR)$(LIBDIR)/libklvae.so $(DESTDIR)$(LIBDIR)/libklvae.a \
	    $(DESTDIR)$(INCLUDEDIR)/klvae.h $(DESTDIR)$(BINDIR)/klvae \
	    $(DESTDIR)$(PKGCONFIGDIR)/klvae.pc $(DESTDIR)$(MANDIR)/man1/klvae.1

# ---- everything else ----

# Installs what the build and the tests need (tools/deps.sh says what and
# why; apt-get, through sudo when not root). demo and the check targets run
# it once by themselves, through build/deps.stamp (see the top).
deps:
	@sh tools/deps.sh
	@mkdir -p build && echo "# tools/deps.sh passed" > build/deps.stamp

build/bench_klvae: tools/bench_klvae.c lib/libklvae.so include/klvae.h
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -O2 -Iinclude $< -o $@ -Llib -lklvae -Wl,-rpath,'$$ORIGIN/../lib'

# the machine's fp32 and bf16 matrix-product rates, for tools/bench.py: it
# calls the library's internal bf16 kernel, so it links the static library
build/bench_gemm: tools/bench_gemm.c $(STATIC) src/backend/cpu/bf16_gemm.h
	$(CC) $(KV_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

build/bench_stream: tools/bench_stream.c lib/libklvae.so include/klvae.h
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -O2 -Iinclude $< -o $@ -Llib -lklvae -Wl,-rpath,'$$ORIGIN/../lib'

build/bench_dataset_klvae: tools/bench_dataset_klvae.c lib/libklvae.so include/klvae.h
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -O2 -Iinclude $< -o $@ -Llib -lklvae -Wl,-rpath,'$$ORIGIN/../lib'

# the procedural images as raw floats, for tools/demo_pytorch.py
build/dump_procedural: tools/dump_procedural.c $(STATIC) src/train/procedural.h
	$(CC) $(KV_CFLAGS) $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

bench: all build/bench_klvae build/bench_dataset_klvae build/bench_gemm
	python3 tools/bench.py $(BENCH_ARGS)

# The README's main command: trains an autoencoder on the built-in procedural
# images for DEMO_MINUTES and leaves demo-run/ (grid.png, loss.png, log.csv,
# eval.csv, checkpoint, model/): the small config on the CPU, or the full SD
# config at 256x256 where a GPU answers (tools/demo.sh).
DEMO_MINUTES ?= 3
DEMO_DIR ?= demo-run
demo: all
	@sh tools/demo.sh $(DEMO_DIR) $(DEMO_MINUTES)

parity: all
	python3 tools/parity.py

fixtures: all
	python3 tools/make_fixtures.py

clean:
	rm -rf build lib/*.so* lib/*.a bin/klvae demo-run

# ==== CUDA backend plugin (cuda/, issue 4) ===========================================
# `make` also builds lib/libklvae_cuda.so when nvcc and cudnn.h (and libcudnn.so) are
# found, else prints one line saying the plugin is skipped. The plugin links the CUDA
# runtime statically and cuDNN 9 and cuBLAS dynamically, found through RUNPATH $ORIGIN
# and the CUDA library folder it was built against (on a GPU machine whose cuDNN and
# cuBLAS come with PyTorch, tests/gpu/check.sh puts site-packages/nvidia/*/lib on
# LD_LIBRARY_PATH). Overrides: NVCC, CUDA_HOME, CUDNN_INCLUDE, CUDNN_LIB, CUDA_WERROR.
# `make check` also runs build/tests/test_cuda, which says SKIPPED without a GPU.
# `make gpu-binaries` builds build/gpu/test_cuda (with tools/bench_cuda.c inside and the
# libraries linked statically) to carry to a GPU machine with the plugin: cuda/README.md.
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
CUDA_HOME ?= $(if $(NVCC),$(patsubst %/bin/nvcc,%,$(realpath $(NVCC))))
CUDNN_INCLUDE ?= $(patsubst %/,%,$(dir $(firstword $(wildcard $(CUDA_HOME)/include/cudnn.h \
                   /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h \
                   /usr/local/include/cudnn.h))))
CUDNN_LIB ?= $(abspath $(dir $(firstword $(wildcard $(CUDNN_INCLUDE)/../lib64/libcudnn.so \
               $(CUDNN_INCLUDE)/../lib/libcudnn.so $(CUDA_HOME)/lib64/libcudnn.so \
               /usr/lib/x86_64-linux-gnu/libcudnn.so))))
CUDA_WERROR ?= -Werror all-warnings
CUDA_ARCH := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
# --fmad=false for posterior.cu alone: gaussian_sample must give the CPU's bits
# (the CPU is built with -ffp-contract=off); every other kernel may fuse.
NVCC_FLAGS := -std=c++17 -O3 $(CUDA_ARCH) $(CUDA_WERROR) \
              -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Wextra -Iinclude -Isrc -I$(CUDNN_INCLUDE)
CUDA_SOURCES := $(wildcard cuda/*.cu)
CUDA_OBJECTS := $(patsubst cuda/%.cu,build/cuda/%.o,$(CUDA_SOURCES))
CUDA_PLUGIN := lib/libklvae_cuda.so
CUDA_RPATH := $$ORIGIN:$(CUDNN_LIB)$(if $(filter $(CUDNN_LIB),$(abspath $(CUDA_HOME)/lib64)),,:$(abspath $(CUDA_HOME)/lib64))
GPU_TEST := build/tests/test_cuda
.PHONY: check-cuda gpu-binaries cuda-skipped install-cuda

ifneq ($(and $(NVCC),$(CUDNN_INCLUDE),$(CUDNN_LIB)),)
CUDA_PLUGIN_BUILT := $(CUDA_PLUGIN)
all: $(CUDA_PLUGIN)
install: install-cuda

build/cuda/%.o: cuda/%.cu $(wildcard cuda/*.h cuda/*.cuh src/base/*.h src/backend/*.h) include/klvae.h
	@mkdir -p build/cuda
	$(NVCC) $(NVCC_FLAGS) $(NVCC_FLAGS_$*) -c $< -o $@
NVCC_FLAGS_posterior := --fmad=false

$(CUDA_PLUGIN): $(CUDA_OBJECTS) cuda/libklvae_cuda.map
	@mkdir -p lib
	$(NVCC) -shared -o $@ $(CUDA_OBJECTS) -cudart static -L$(CUDNN_LIB) -L$(CUDA_HOME)/lib64 \
	    -lcudnn -lcublas -Xlinker --version-script=cuda/libklvae_cuda.map -Xlinker --no-undefined \
	    -Xlinker -rpath,'$(CUDA_RPATH)'

install-cuda: $(CUDA_PLUGIN)
	install -d $(DESTDIR)$(LIBDIR)
	install -m 755 $(CUDA_PLUGIN) $(DESTDIR)$(LIBDIR)/
else
all: cuda-skipped
cuda-skipped:
	@echo "CUDA plugin skipped: $(if $(NVCC),$(if $(CUDNN_INCLUDE),libcudnn.so not found,cudnn.h not found),nvcc not found) (lib/libklvae_cuda.so is not built; the CPU backend is)"
endif

uninstall: uninstall-cuda
.PHONY: uninstall-cuda
uninstall-cuda:
	rm -f $(DESTDIR)$(LIBDIR)/libklvae_cuda.so

GPU_TEST_SOURCES := tests/gpu/test_cuda.c tests/gpu/test_cuda_train.c tests/gpu/test_cuda_util.c \
                    tests/gpu/cuda_harness.c
# -Werror: these programs only run on a GPU machine, so a warning here is the
# only notice of a drift before GPU time is spent on it.
$(GPU_TEST): $(GPU_TEST_SOURCES) tests/gpu/cuda_harness.h tests/gpu/test_cuda.h $(STATIC) \
             $(LIB_HEADERS)
	@mkdir -p build/tests
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) $(GPU_TEST_SOURCES) -o $@ $(STATIC) $(LDFLAGS) \
	    $(DEP_LIBS) $(SYS_LIBS)

# the NCCL path of data-parallel training (tests/gpu/check_nccl.sh runs it on a GPU)
NCCL_TEST := build/tests/test_nccl
$(NCCL_TEST): tests/gpu/test_nccl.c tests/gpu/cuda_harness.c tests/gpu/cuda_harness.h $(STATIC) \
              $(LIB_HEADERS)
	@mkdir -p build/tests
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) tests/gpu/test_nccl.c tests/gpu/cuda_harness.c \
	    -o $@ $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

check: check-cuda
# build/bench_cuda only runs on a GPU machine: building it here is the notice
# that it no longer compiles against the backend interface
check-cuda: $(GPU_TEST) $(NCCL_TEST) $(CUDA_PLUGIN_BUILT) build/bench_cuda
	@./$(GPU_TEST) --plugin lib/libklvae_cuda.so --quick
	@./$(NCCL_TEST) --plugin lib/libklvae_cuda.so --quick

# For a GPU machine without this machine's libraries: one binary, test_cuda with the
# benchmark inside (`test_cuda bench ...`), with OpenBLAS, jansson, libpng, libjpeg, zlib
# and libgfortran linked statically. build/bench_cuda: the benchmark alone.
GPU_STATIC_LIBS := $(filter -L%,$(DEP_LIBS)) -Wl,-Bstatic -lopenblas -ljansson -lpng16 -ljpeg -lz \
                   -lgfortran -lquadmath -Wl,-Bdynamic $(SYS_LIBS)
gpu-binaries: build/gpu/test_cuda build/gpu/test_nccl
build/gpu/test_nccl: tests/gpu/test_nccl.c tests/gpu/cuda_harness.c tests/gpu/cuda_harness.h \
                     $(STATIC) $(LIB_HEADERS)
	@mkdir -p build/gpu
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) tests/gpu/test_nccl.c tests/gpu/cuda_harness.c \
	    -o $@ $(STATIC) -s $(GPU_STATIC_LIBS)
build/gpu/test_cuda: $(GPU_TEST_SOURCES) tools/bench_cuda.c tests/gpu/cuda_harness.h \
                     tests/gpu/test_cuda.h $(STATIC) $(LIB_HEADERS) build/obj/cli/common.o
	@mkdir -p build/gpu
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) -DKV_WITH_BENCH -c tests/gpu/test_cuda.c \
	    -o build/gpu/test_cuda.o
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) -DKV_BENCH_NO_MAIN -c tools/bench_cuda.c \
	    -o build/gpu/bench_cuda.o
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) -c tests/gpu/cuda_harness.c \
	    -o build/gpu/cuda_harness.o
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) -c tests/gpu/test_cuda_train.c \
	    -o build/gpu/test_cuda_train.o
	$(CC) $(KV_CFLAGS) -Werror -Itests/gpu $(CFLAGS) -c tests/gpu/test_cuda_util.c \
	    -o build/gpu/test_cuda_util.o
	$(CC) -o $@ build/gpu/test_cuda.o build/gpu/test_cuda_train.o build/gpu/test_cuda_util.o \
	    build/gpu/bench_cuda.o build/gpu/cuda_harness.o build/obj/cli/common.o $(STATIC) -s \
	    $(GPU_STATIC_LIBS)
build/bench_cuda: tools/bench_cuda.c tests/gpu/cuda_harness.c tests/gpu/cuda_harness.h $(STATIC) \
                  build/obj/cli/common.o
	$(CC) $(KV_CFLAGS) -Itests/gpu $(CFLAGS) tools/bench_cuda.c tests/gpu/cuda_harness.c \
	    build/obj/cli/common.o -o $@ $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)
# One archive of what a GPU machine runs (4 MB where the files are 55 MB, most
# of it OpenBLAS twice), for device calls whose working tree must stay small:
# carry build/gpu-bundle.tar.xz, unpack it there, run tests/gpu/check.sh.
.PHONY: gpu-bundle
gpu-bundle: build/gpu-bundle.tar.xz
build/gpu-bundle.tar.xz: build/gpu/test_cuda build/gpu/test_nccl $(CUDA_PLUGIN_BUILT)
	tar cJf $@ build/gpu/test_cuda build/gpu/test_nccl $(CUDA_PLUGIN_BUILT)
build/tests/test_cuda_host.o: $(wildcard cuda/*.cuh)
# ==== end of the CUDA block ===========================================================

# ==== Fuzzing (tests/fuzz/, docs/reliability.md) =====================================
# One libFuzzer harness per parser, built with clang and ASan + UBSan, linked with the
# library's sources compiled the same way into build/fuzz/ (not build/obj). `make fuzz`
# builds them and runs each for FUZZ_SECONDS seconds (default 60; 0 only builds) on
# build/fuzz/corpus/NAME/, a scratch copy of tests/fuzz/corpus/NAME/ (the committed seeds
# are never written to; inputs found are kept there between runs). A crash or a broken
# invariant stops that harness, writes its input to build/fuzz/artifacts/NAME/ and fails
# the target. `make fuzz-run-NAME` runs one harness (NAME: the part after fuzz_).
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS := -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
               -fno-sanitize-recover=undefined -Wno-unknown-pragmas
FUZZ_NAMES := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BINS := $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_NAMES))
FUZZ_LIB_OBJECTS := $(patsubst src/%.c,build/fuzz/obj/%.o,$(LIB_SOURCES) src/cli/latents.c)
FUZZ_RUN_FLAGS := -rss_limit_mb=2048 -timeout=30 -print_final_stats=1
.PHONY: fuzz fuzz-build
.SECONDARY: $(FUZZ_LIB_OBJECTS) build/fuzz/fuzz.o

build/fuzz/obj/%.o: src/%.c $(LIB_HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(KV_CFLAGS) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

build/fuzz/fuzz.o: tests/fuzz/fuzz.c tests/fuzz/fuzz.h include/klvae.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(KV_CFLAGS) $(FUZZ_CFLAGS) -c $< -o $@

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(wildcard tests/fuzz/*.h) build/fuzz/fuzz.o $(FUZZ_LIB_OBJECTS)
	$(FUZZ_CC) $(KV_CFLAGS) $(FUZZ_CFLAGS) -fsanitize=fuzzer -Itests/fuzz \
	    -DKV_FUZZ_FIXTURES='"$(CURDIR)/tests/fixtures"' $< build/fuzz/fuzz.o $(FUZZ_LIB_OBJECTS) \
	    -o $@ $(DEP_LIBS) $(SYS_LIBS)

fuzz-build: $(FUZZ_BINS)

fuzz: fuzz-build
	@[ "$(FUZZ_SECONDS)" -gt 0 ] || exit 0; status=0; \
	for name in $(FUZZ_NAMES); do $(MAKE) --no-print-directory fuzz-run-$$name || status=1; done; \
	exit $$status

fuzz-run-%: build/fuzz/fuzz_%
	@mkdir -p build/fuzz/corpus/$* build/fuzz/artifacts/$*
	cp tests/fuzz/corpus/$*/* build/fuzz/corpus/$*/
	KLVAE_FUZZ_SEED_DIR=build/fuzz/corpus/$* ./build/fuzz/fuzz_$* $(FUZZ_RUN_FLAGS) \
	    -max_total_time=$(FUZZ_SECONDS) $(if $(wildcard tests/fuzz/$*.dict),-dict=tests/fuzz/$*.dict) \
	    -artifact_prefix=build/fuzz/artifacts/$*/ build/fuzz/corpus/$*

# Rewrites the committed seeds (only to change them): tests/fuzz/make_corpus.c.
.PHONY: fuzz-corpus
fuzz-corpus: $(STATIC)
	@mkdir -p build/fuzz
	$(CC) $(KV_CFLAGS) $(CFLAGS) tests/fuzz/make_corpus.c -o build/fuzz/make_corpus $(STATIC) \
	    $(DEP_LIBS) $(SYS_LIBS)
	rm -rf tests/fuzz/corpus
	./build/fuzz/make_corpus tests/fuzz/corpus tests/fixtures
