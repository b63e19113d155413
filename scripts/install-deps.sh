#!/usr/bin/env bash
# Install the Debian 12 packages chainfs needs to build, run, test and
# benchmark.  Does nothing when they are all present already.
set -euo pipefail
pkgs=(build-essential libfuse3-dev fuse3 libglib2.0-dev zlib1g-dev meson ninja-build
      pkg-config qemu-utils python3-pytest attr fio qemu-system-common
      qemu-system-x86 seabios    # tests/test_guest_qemu.py: a TCG guest on the export
      clang libclang-rt-14-dev   # ThreadSanitizer and libFuzzer builds
      e2fsprogs mount util-linux # loop-mounted ext4, chattr, setpriv, mount -T
      debhelper dpkg-dev         # the .deb (tests/test_install.py)
      systemd man-db)            # systemd-analyze verify of the unit and man pages
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
