#!/usr/bin/env bash
# Builds the Debian packages fedshield-edge and fedshield-host for one architecture from
# binaries already built:
#
#   scripts/build-deb.sh --arch amd64|arm64 --bin-dir DIR --out DIR [--version V]
#
#   DIR/fedshield-edge, DIR/fedshield-host   the binaries (release: target/release, or
#                                            target/aarch64-unknown-linux-gnu/release)
#   DEB_COMPRESSION=none                     store the files uncompressed (the tests)
#
# Each package holds its binary (/usr/bin), its systemd unit (/lib/systemd/system: a
# dedicated user `fedshield`, restart on failure, state in /var/lib/fedshield), its
# settings /etc/fedshield/{edge,host}.toml and environment /etc/fedshield/{edge,host}.env
# (conffiles, 0640 root:fedshield after install: the environment holds the MQTT
# password). The host package also holds the fold workers' template unit
# fedshield-fold-worker@.service and their settings /etc/fedshield/fold-worker.toml.
# libtorch and ONNX Runtime are not packaged: the platform's go under
# /usr/lib/fedshield (FEDSHIELD_DEPS_DIR in the .env file; on Jetson, JetPack's PyTorch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARCH="" BIN="" OUT="" VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --bin-dir) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$ARCH" ] && [ -n "$BIN" ] && [ -n "$OUT" ] \
  || { echo "usage: scripts/build-deb.sh --arch amd64|arm64 --bin-dir DIR --out DIR" >&2; exit 2; }
case "$ARCH" in
  amd64) MACHINE=3e ;;   # ELF e_machine of x86-64
  arm64) MACHINE=b7 ;;   # ... and of aarch64
  *) echo "build-deb: --arch must be amd64 or arm64, not $ARCH" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

for who in edge host; do
  exe="$BIN/fedshield-$who"
  [ -x "$exe" ] || { echo "build-deb: $exe not found (build it first)" >&2; exit 1; }
  got=$(od -An -tx1 -j18 -N1 "$exe" | tr -d ' ')
  [ "$got" = "$MACHINE" ] \
    || { echo "build-deb: $exe is not an $ARCH binary (ELF machine 0x$got)" >&2; exit 1; }
  root="$STAGE/fedshield-$who"
  install -D -m 0755 "$exe" "$root/usr/bin/fedshield-$who"
  install -D -m 0644 "packaging/fedshield-$who.service" "$root/lib/systemd/system/fedshield-$who.service"
  install -D -m 0640 "packaging/$who.toml" "$root/etc/fedshield/$who.toml"
  install -D -m 0640 "packaging/$who.env" "$root/etc/fedshield/$who.env"
  etc="/etc/fedshield/$who.toml /etc/fedshield/$who.env"
  if [ "$who" = host ]; then
    install -D -m 0644 "packaging/fedshield-fold-worker@.service" \
      "$root/lib/systemd/system/fedshield-fold-worker@.service"
    install -D -m 0640 packaging/fold-worker.toml "$root/etc/fedshield/fold-worker.toml"
    etc="$etc /etc/fedshield/fold-worker.toml"
  fi
  install -D -m 0644 README.md "$root/usr/share/doc/fedshield-$who/README.md"
  install -d -m 0755 "$root/DEBIAN"
  case "$who" in
    edge) what="edge client: fine-tunes LoRA adapters on a quantized LLM, encrypts and uploads its updates" ;;
    host) what="host aggregator: sums a fleet's encrypted LoRA updates and decrypts only the aggregate" ;;
  esac
  cat > "$root/DEBIAN/control" <<CONTROL
Package: fedshield-$who
Version: $VERSION
Architecture: $ARCH
Maintainer: FedShield <fedshield@localhost>
Section: misc
Priority: optional
Depends: adduser, libc6 (>= 2.31), libstdc++6, libgcc-s1
Installed-Size: $(du -sk "$root" | cut -f1)
Description: FedShield $what
 Privacy-preserving federated fine-tuning of LLMs on fleets of edge GPUs.
 libtorch and ONNX Runtime are the platform's, under /usr/lib/fedshield.
CONTROL
  printf '%s\n' $etc > "$root/DEBIAN/conffiles"
  cat > "$root/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
  getent group fedshield >/dev/null || addgroup --system fedshield
  getent passwd fedshield >/dev/null || adduser --system --ingroup fedshield \\
    --home /var/lib/fedshield --no-create-home --shell /usr/sbin/nologin fedshield
  chown root:fedshield $etc
  chmod 0640 $etc
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
POSTINST
  cat > "$root/DEBIAN/prerm" <<PRERM
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "\$1" = remove ]; then
  systemctl stop fedshield-$who.service || true
fi
PRERM
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm"
  deb="$OUT/fedshield-${who}_${VERSION}_${ARCH}.deb"
  dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
  echo "$deb"
done
