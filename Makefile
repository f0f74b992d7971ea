# libklvae — one entry point for building, testing and installing.
#
#   make              library (lib/), CLI (bin/klvae), C examples (build/examples/)
#   make demo         trains the small config on procedural images for 3 minutes (demo-run/)
#   make check        the test suite (Check), then the CLI and install tests
#   make check-asan   the same suite under AddressSanitizer and UBSan
#   make install      PREFIX=/usr/local DESTDIR= (GNU conventions)
#   make deps         installs the Debian packages the build and tests need
#   make bench        times encode/decode against PyTorch (tools/bench.py)
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
# -ffp-contract=off: the Philox sampler must round exactly as the CUDA one does.
KV_CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -fPIC -fvisibility=hidden -ffp-contract=off \
             -pthread -Iinclude $(DEP_CFLAGS)
SYS_LIBS := -lm -lpthread -ldl

LIB_SOURCES := $(wildcard src/*.c) $(wildcard src/cpu/*.c)
LIB_OBJECTS := $(patsubst src/%.c,build/obj/%.o,$(LIB_SOURCES))
CLI_SOURCES := $(wildcard src/cli/*.c)
CLI_OBJECTS := $(patsubst src/%.c,build/obj/%.o,$(CLI_SOURCES))
# the tool's pieces without its main(), which the unit tests link too
CLI_PARTS := $(filter-out build/obj/cli/klvae.o,$(CLI_OBJECTS))
EXAMPLES := $(patsubst examples/c/%.c,build/examples/%,$(wildcard examples/c/*.c))
TEST_SOURCES := $(wildcard tests/*.c)
TEST_OBJECTS := $(patsubst tests/%.c,build/tests/%.o,$(TEST_SOURCES))

SHARED := lib/libklvae.so.$(VERSION)
SONAME := libklvae.so.$(VERSION_MAJOR)
STATIC := lib/libklvae.a
CLI := bin/klvae
TEST_BIN := build/tests/check_klvae

.PHONY: all lib examples check check-unit check-asan install uninstall clean deps bench demo \
        parity fixtures

all: lib $(CLI) examples build/klvae-uninstalled.pc

lib: $(SHARED) lib/$(SONAME) lib/libklvae.so $(STATIC)

build/obj/%.o: src/%.c $(wildcard src/*.h src/cpu/*.h include/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) $(CFLAGS) -c $< -o $@

# The CPU ops are streaming loops: let the vectoriser take every loop it can
# (GCC's -O2 only takes loops that need no remainder or alias checks, and
# -fno-trapping-math lets it turn float comparisons into selects).
build/obj/cpu/%.o: src/cpu/%.c $(wildcard src/*.h src/cpu/*.h include/*.h)
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
build/obj/cli/%.o: src/cli/%.c $(wildcard src/*.h src/cli/*.h include/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(KV_CFLAGS) -Isrc $(CFLAGS) -c $< -o $@

$(CLI): $(CLI_OBJECTS) $(STATIC)
	@mkdir -p bin
	$(CC) -o $@ $(CLI_OBJECTS) $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

examples: $(EXAMPLES)

build/examples/%: examples/c/%.c lib/libklvae.so include/klvae.h
	@mkdir -p build/examples
	$(CC) -std=c11 -Wall -Wextra $(CFLAGS) -Iinclude $< -o $@ -Llib -lklvae \
	    -Wl,-rpath,'$$ORIGIN/../../lib' -lm

build/klvae-uninstalled.pc: pkgconfig/klvae-uninstalled.pc.in include/klvae.h
	@mkdir -p build
	sed -e 's|@TOP@|$(CURDIR)|' -e 's|@VERSION@|$(VERSION)|' $< > $@

# ---- tests ----

CHECK_CFLAGS := $(shell $(PKG_CONFIG) --cflags check 2>/dev/null)
CHECK_LIBS := $(shell $(PKG_CONFIG) --libs check 2>/dev/null || echo -lcheck -lsubunit -lrt -lm)

build/tests/%.o: tests/%.c tests/test_util.h $(wildcard src/*.h src/cpu/*.h src/cli/*.h include/*.h)
	@mkdir -p build/tests
	$(CC) $(KV_CFLAGS) -Isrc $(CHECK_CFLAGS) $(CFLAGS) -c $< -o $@

# The tests link the static library so that they can reach internal ops.
$(TEST_BIN): $(TEST_OBJECTS) $(CLI_PARTS) $(STATIC)
	$(CC) -o $@ $(TEST_OBJECTS) $(CLI_PARTS) $(STATIC) $(LDFLAGS) $(CHECK_LIBS) $(DEP_LIBS) $(SYS_LIBS)

check-unit: $(TEST_BIN)
	cd tests && ../$(TEST_BIN)

check: all $(TEST_BIN)
	@status=0; \
	(cd tests && ../$(TEST_BIN)) || status=1; \
	sh tests/cli_test.sh || status=1; \
	sh tests/install_test.sh || status=1; \
	sh tests/docs_test.sh || status=1; \
	exit $$status

ASAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
check-asan:
	$(MAKE) clean-objects
	$(MAKE) CFLAGS="$(ASAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(TEST_BIN)
	cd tests && ASAN_OPTIONS=detect_leaks=1 CK_FORK=no ../$(TEST_BIN); \
	status=$$?; cd .. && $(MAKE) clean-objects; exit $$status

.PHONY: clean-objects
clean-objects:
	rm -rf build/obj build/tests lib/*.so* lib/*.a bin/klvae

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

# Debian packages: compiler, pkg-config, Check, OpenBLAS (CBLAS), jansson,
# libpng, libjpeg-turbo.
DEB_PACKAGES := build-essential pkgconf check libopenblas-dev libjansson-dev libpng-dev \
                libjpeg62-turbo-dev
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; \
	else echo "all build and test dependencies are installed"; fi

build/bench_klvae: tools/bench_klvae.c lib/libklvae.so include/klvae.h
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -O2 -Iinclude $< -o $@ -Llib -lklvae -Wl,-rpath,'$$ORIGIN/../lib'

# the procedural images as raw floats, for tools/demo_pytorch.py
build/dump_procedural: tools/dump_procedural.c $(STATIC) src/data.h
	$(CC) $(KV_CFLAGS) -Isrc $(CFLAGS) $< -o $@ $(STATIC) $(LDFLAGS) $(DEP_LIBS) $(SYS_LIBS)

bench: all build/bench_klvae
	python3 tools/bench.py $(BENCH_ARGS)

# The README's main command: trains the small config on the built-in
# procedural images for DEMO_MINUTES of this machine and leaves demo-run/
# (grid.png, loss.png, log.csv, eval.csv, checkpoint, model/).
DEMO_MINUTES ?= 3
DEMO_DIR ?= demo-run
demo: all
	@echo "klvae demo: training the 'small' autoencoder (3.9 M parameters) on procedural"
	@echo "64x64 images for $(DEMO_MINUTES) minutes on the CPU; pixel + KL loss (no LPIPS"
	@echo "weights on a fresh machine; see docs/training.md). Output: $(DEMO_DIR)/"
	@rm -rf $(DEMO_DIR)
	./bin/klvae train --config small --size 64 --batch 4 --learning-rate 3e-4 \
	    --perceptual-weight 0 --steps 100000 --minutes $(DEMO_MINUTES) \
	    --grid-every 50 --checkpoint-every 200 --eval-images 8 --out $(DEMO_DIR)
	@echo "look at $(DEMO_DIR)/grid.png (top: held-out inputs, bottom: reconstructions)"
	@echo "and $(DEMO_DIR)/loss.png; the model is $(DEMO_DIR)/model/"

parity: all
	python3 tools/parity.py

fixtures: all
	python3 tools/make_fixtures.py

clean:
	rm -rf build lib/*.so* lib/*.a bin/klvae demo-run
