#!/usr/bin/env bash
# Cross-builds fedshield-edge and fedshield-host for aarch64-unknown-linux-gnu (the Jetson's
# architecture) against the aarch64 libtorch and ONNX Runtime of the pinned PyPI wheels,
# then runs the aarch64 edge under qemu-user.
#
#   scripts/build-aarch64.sh [--profile release|dev] [--no-run] [--train] [--federate]
#
# Needs scripts/setup.sh (the aarch64 Rust target, gcc-aarch64-linux-gnu, qemu-user-static);
# installs g++-aarch64-linux-gnu when missing. What it downloads is cached, sha256-pinned,
# in .deps/aarch64/:
#   torch 2.13.0 (manylinux_2_28_aarch64)   libtorch: headers and the CPU libraries (the
#                                           CUDA ones are left out: on a Jetson, JetPack's
#                                           libtorch is used); its CPU library also links
#                                           libcudart.so.13 and libcupti.so.13, taken from
#   nvidia-cuda-runtime 13.0.96, nvidia-cuda-cupti 13.0.85 (aarch64)
#   onnxruntime 1.32.0 (manylinux_2_28_aarch64)   libonnxruntime.so
# .deps/aarch64 has the layout of .deps (torch/, libonnxruntime.so, model/, data/): it is
# the FEDSHIELD_DEPS_DIR of the aarch64 binaries under qemu.
#
# The arm64 .deb packages of the binaries go to target/aarch64-unknown-linux-gnu/<profile>/deb/.
# Then, under qemu-aarch64: `fedshield-edge doctor` (libtorch forward and backward, an ONNX
# Runtime inference, the model files) and `fedshield-edge keygen`; with --train also two
# SmolLM2 training steps (about 20 minutes under qemu), whose losses must equal those of
# the x86-64 build to the printed digits; with --federate also one federated round of a
# mixed fleet (tens of minutes): the x86-64 host and two x86-64 edges on loopback with the
# aarch64 edge under qemu (the ignored whole-system test
# an_aarch64_edge_under_qemu_and_two_x86_64_edges_decrypt_to_their_plaintexts, through the
# wrapper target/aarch64-unknown-linux-gnu/<profile>/qemu-fedshield-edge written here): all
# three contribute and the decrypted sum equals their audited plaintexts. The binaries are
# in target/aarch64-unknown-linux-gnu/<profile>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PROFILE=release
RUN=1
TRAIN=0
FEDERATE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --train) TRAIN=1; shift ;;
    --federate) FEDERATE=1; shift ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-run) RUN=0; shift ;;
    *) echo "build-aarch64: unknown argument $1" >&2; exit 2 ;;
  esac
done
say() { printf '[aarch64] %s\n' "$*"; }
die() { printf '[aarch64] error: %s\n' "$*" >&2; exit 1; }
start=$(date +%s)

scripts/setup.sh >/dev/null
need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v patchelf >/dev/null 2>&1 || need+=(patchelf)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
fi

ARM="$ROOT/.deps/aarch64"
WHEELS="$ARM/wheels"
PIP="$ROOT/.deps/venv/bin/pip"
mkdir -p "$WHEELS"
# name==version, file, sha256
PINS=(
  "torch==2.13.0|torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl|092790c696a760c729fd5722835f50b9d81fd7c8f141571f3f3cf4081a8f664c"
  "onnxruntime==1.32.0|onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl|2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c"
  "nvidia-cuda-runtime==13.0.96|nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_aarch64.manylinux_2_17_aarch64.whl|ef9bcbe90493a2b9d810e43d249adb3d02e98dd30200d86607d8d02687c43f55"
  "nvidia-cuda-cupti==13.0.85|nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_aarch64.whl|796bd679890ee55fb14a94629b698b6db54bcfd833d391d5e94017dd9d7d3151"
)
for pin in "${PINS[@]}"; do
  IFS='|' read -r spec file sha <<<"$pin"
  if [ ! -f "$WHEELS/$file" ]; then
    say "downloading $spec (aarch64)"
    "$PIP" download -q --no-cache-dir --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.11 --platform manylinux_2_28_aarch64 --platform manylinux_2_25_aarch64 \
      --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 "$spec" -d "$WHEELS" \
      || die "pip download $spec failed: is PyPI reachable?"
  fi
  got=$(sha256sum "$WHEELS/$file" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$WHEELS/$file"
    die "$file has sha256 $got, expected $sha; removed, run again (if it repeats, review the upstream file and update the pin)"
  fi
done

STAMP="$ARM/stamp"
if [ "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ]; then
  say "unpacking libtorch and ONNX Runtime for aarch64"
  rm -rf "$ARM/torch" "$ARM/unpack"
  "$ROOT/.deps/venv/bin/python" - "$WHEELS" "$ARM" <<'PY'
import os, shutil, sys, zipfile
wheels, arm = sys.argv[1], sys.argv[2]
cuda = ("libtorch_cuda", "libc10_cuda", "libcaffe2_nvrtc", "libtorch_nvshmem", "libtorch_python")
def copy(z, name, dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with z.open(name) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
for wheel in os.listdir(wheels):
    z = zipfile.ZipFile(os.path.join(wheels, wheel))
    for name in z.namelist():
        base = os.path.basename(name)
        if wheel.startswith("torch-"):
            if name.startswith(("torch/include/", "torch/lib/", "torch/share/")) \
                    and base and not base.startswith(cuda):
                copy(z, name, os.path.join(arm, name))
        elif wheel.startswith("onnxruntime-"):
            if name.startswith("onnxruntime/capi/libonnxruntime.so"):
                copy(z, name, os.path.join(arm, "libonnxruntime.so"))
        elif base in ("libcudart.so.13", "libcupti.so.13"):
            copy(z, name, os.path.join(arm, "torch", "lib", base))
PY
  ln -sfn ../model "$ARM/model"
  ln -sfn ../data "$ARM/data"
  echo "${PINS[*]}" > "$STAMP"
fi

export LIBTORCH="${LIBTORCH_AARCH64:-$ARM/torch}" LIBTORCH_CXX11_ABI=1
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# The binaries' default place for libtorch, ONNX Runtime, the model and the data.
export FEDSHIELD_DEPS_DIR="$ARM"
say "building fedshield-edge and fedshield-host ($PROFILE)"
build_start=$(date +%s)
cargo build --locked --profile "$PROFILE" --target aarch64-unknown-linux-gnu \
  -p fedshield-edge -p fedshield-host
built=$(( $(date +%s) - build_start ))
case "$PROFILE" in dev) DIR=debug ;; *) DIR=$PROFILE ;; esac
OUT="target/aarch64-unknown-linux-gnu/$DIR"
for b in fedshield-edge fedshield-host; do
  [ "$(od -An -tx1 -j18 -N1 "$OUT/$b" | tr -d ' ')" = b7 ] || die "$OUT/$b is not an aarch64 binary"
done
# The wheel's libtorch.so only joins libtorch_cpu and libtorch_cuda; with the CUDA library
# left out (a CPU build), the binaries must not ask for it. Against a libtorch with CUDA
# (JetPack's: LIBTORCH_AARCH64=DIR) they keep it.
if [ ! -e "$LIBTORCH/lib/libtorch_cuda.so" ]; then
  patchelf --remove-needed libtorch.so "$OUT/fedshield-edge"
fi
say "built in $built s: $(ls -la "$OUT/fedshield-edge" | awk '{print $5}') bytes (edge), $(ls -la "$OUT/fedshield-host" | awk '{print $5}') bytes (host)"
# The arm64 packages of these binaries (what a Jetson installs: README, "Deploying a fleet").
scripts/build-deb.sh --arch arm64 --bin-dir "$OUT" --out "$OUT/deb" >/dev/null
for p in fedshield-edge fedshield-host; do
  deb="$OUT/deb/${p}_$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)_arm64.deb"
  [ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || die "$deb is not an arm64 package"
  files=$(dpkg-deb -c "$deb")
  grep -q "usr/bin/$p\$" <<<"$files" || die "$deb has no /usr/bin/$p"
done
say "arm64 packages in $OUT/deb: $(ls "$OUT/deb" | tr '\n' ' ')"

if [ $RUN = 1 ]; then
  # qemu-user shows the guest this machine's x86 /proc/cpuinfo, which libtorch's CPU
  # detection (cpuinfo) cannot parse on aarch64 and dies on: the runs see a Neoverse-N1's
  # (the CPU qemu emulates) through a private mount namespace.
  CPUINFO=$(mktemp)
  for n in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$n"
  done > "$CPUINFO"
  export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu QEMU_CPU=neoverse-n1
  export LD_LIBRARY_PATH="$LIBTORCH/lib" FEDSHIELD_DEVICE=cpu
  arm() {
    unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && exec qemu-aarch64-static "$@"' \
      "$CPUINFO" "$@"
  }
  say "under qemu-aarch64: fedshield-edge doctor"
  t=$(date +%s)
  arm "$OUT/fedshield-edge" doctor 2>&1 | grep -v 'MIDR_EL1'
  [ "${PIPESTATUS[0]}" = 0 ] || die "doctor failed under qemu"
  say "doctor under qemu: $(( $(date +%s) - t )) s"
  keys=$(mktemp -d)
  arm "$OUT/fedshield-edge" keygen --device edge-arm --out "$keys" >/dev/null
  [ -s "$keys/enrolment-request.json" ] || die "keygen under qemu wrote no request"
  arm "$OUT/fedshield-host" --version
  rm -rf "$keys"
  # The x86-64 build and runs use this project's own settings (.cargo/config.toml), not
  # the aarch64 libtorch and deps directory exported above.
  native=(env -u LIBTORCH -u FEDSHIELD_DEPS_DIR -u LD_LIBRARY_PATH -u QEMU_LD_PREFIX -u QEMU_CPU
    -u FEDSHIELD_DEVICE)
  if [ $TRAIN = 1 ]; then
    train=(train --steps 2 --batch 1 --max-len 16 --rank 1 --targets v_proj --threads 1
      --no-probe --eval-every 0 --no-pacing)
    losses() { grep -E '^(eval|step)' | sed 's/ [0-9.]* tok\/s//'; }
    say "two SmolLM2 training steps on x86-64, then under qemu-aarch64"
    "${native[@]}" cargo build --locked -q -p fedshield-edge
    x86=$("${native[@]}" target/debug/fedshield-edge "${train[@]}" --out "$(mktemp -d)" 2>&1 \
      | losses)
    t=$(date +%s)
    aarch64=$(arm "$OUT/fedshield-edge" "${train[@]}" --out "$(mktemp -d)" 2>&1 | losses)
    say "trained under qemu in $(( $(date +%s) - t )) s"
    printf '%s\n' "$aarch64"
    [ "$x86" = "$aarch64" ] || die "the losses differ from x86-64's: $x86"
    say "the same losses as on x86-64"
  fi
  if [ $FEDERATE = 1 ]; then
    wrapper="$ROOT/$OUT/qemu-fedshield-edge"
    cat > "$wrapper" <<WRAPPER
#!/bin/sh
# The aarch64 fedshield-edge under qemu-user, as a program of this machine (written by
# scripts/build-aarch64.sh --federate; valid while $CPUINFO exists).
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu QEMU_CPU=neoverse-n1 FEDSHIELD_DEVICE=cpu
export LD_LIBRARY_PATH="$LIBTORCH/lib" FEDSHIELD_DEPS_DIR="$ARM"
exec unshare -m sh -c 'mount --bind "\$0" /proc/cpuinfo && exec qemu-aarch64-static "\$@"' \
  "$CPUINFO" "$ROOT/$OUT/fedshield-edge" "\$@"
WRAPPER
    chmod +x "$wrapper"
    say "one federated round: x86-64 host and two x86-64 edges, one aarch64 edge under qemu"
    t=$(date +%s)
    "${native[@]}" cargo build --locked -q -p fedshield-edge -p fedshield-host
    log=$(mktemp)
    if ! FEDSHIELD_AARCH64_EDGE="$wrapper" "${native[@]}" cargo test --locked -q \
      -p fedshield-hil-tests --test federation -- --ignored --exact --nocapture \
      an_aarch64_edge_under_qemu_and_two_x86_64_edges_decrypt_to_their_plaintexts \
      >"$log" 2>&1; then
      grep -E '^(test |failures|thread)|panicked|error' "$log" | tail -40 >&2
      die "the mixed-architecture round failed (whole log: $log)"
    fi
    grep -E '^mixed-architecture' "$log"
    rm -f "$log"
    say "mixed-architecture round in $(( $(date +%s) - t )) s"
  fi
  rm -f "$CPUINFO"
fi
say "done in $(( $(date +%s) - start )) s"
