# The project's commands. `make demo` and `make test` start with scripts/bootstrap, which installs
# what is missing and takes a fraction of a second when nothing is.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# Plain output: CI logs and test expectations should not depend on a terminal.
export CARGO_TERM_COLOR := never

# Where scripts/bootstrap puts the pinned tools (kubernetes-validate, jsonschema, helm).
TOOLS_PATH := $(CURDIR)/.venv/bin:$(CURDIR)/.tools/bin

.PHONY: bootstrap test demo bench crds

bootstrap:
	scripts/bootstrap

# What CI runs (.ci/run). Formatting, lints and docs first: they fail in seconds, the tests in minutes.
test: bootstrap
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
	PATH="$(TOOLS_PATH):$$PATH" cargo test --workspace

# examples/conference.yaml run locally: one media-server process per planned server, each region on
# its own loopback address, one mesh, BOTS (default 3) talking bots. Prints a join URL per region.
# First chorus-demo-pbx: the conference's call manager (Kamailio on 127.0.0.1:5060) and a talking
# desk phone, extension 1001. It reads a pipe this shell holds, so it stops when the demo does
# (Ctrl-C, SIGTERM, or the shell killed); without a free port 5060 the demo runs without a phone.
BOTS ?= 3
demo: bootstrap
	cargo build -q -p chorus-operator -p chorus-mediaserver -p chorus-tests --bin chorus-operator --bin chorus-mediaserver --bin chorus-bot --bin chorus-demo-pbx
	bin="$$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"; \
	exec {pbx}> >("$$bin/chorus-demo-pbx" || true); pbx_pid=$$!; \
	status=0; "$$bin/chorus-operator" local -f examples/conference.yaml --bots $(BOTS) || status=$$?; \
	exec {pbx}>&-; wait "$$pbx_pid" 2>/dev/null || true; exit "$$status"

# Benchmarks (timing is measured here, never asserted in tests): every scenario RUNS times, side by
# side with Janus AudioBridge; writes bench/results/latest.json and BENCHMARKS.md. Release build,
# run directly (not `cargo run`: the harness builds chorus-mediaserver itself, and a nested cargo
# would wait on `cargo run`'s build lock). Takes about 5 minutes per run on 2 cores, after the build.
RUNS ?= 3
bench: bootstrap
	cargo build --release -q -p chorus-tests -p chorus-mediaserver --bin chorus-bench --bin chorus-mediaserver
	"$$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/chorus-bench" --runs $(RUNS)

# Regenerates the CRD from crds/src/conference.rs. A test fails when the two differ. Written to a
# temporary file first, so a failed build leaves the old CRD in place instead of an empty one. Also
# writes the Helm chart's copy (charts/chorus/templates/crd.yaml); a test checks the two agree.
crds:
	cargo run -q -p chorus-operator -- crd > crds/conference.yaml.tmp || { rm -f crds/conference.yaml.tmp; exit 1; }
	mv crds/conference.yaml.tmp crds/conference.yaml
	{ echo '{{- if .Values.crds.install }}'; cat crds/conference.yaml; echo '{{- end }}'; } > charts/chorus/templates/crd.yaml
