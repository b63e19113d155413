#!/usr/bin/env bash
# Install what chainfs needs (Debian 12), build it, and mount a directory of
# images:  ./setup-and-run.sh [IMAGE_DIR [MOUNTPOINT]]
# Without IMAGE_DIR it creates a demo chain in ./demo/images
# (base.img <- snap1.qcow2 <- vm1.qcow2) and mounts it on ./demo/mnt.
set -euo pipefail
cd "$(dirname "$0")"
root=$PWD
bash scripts/install-deps.sh
BUILD_DIR=build scripts/build.sh
modprobe fuse 2>/dev/null || true

image_dir=${1:-}
mnt=${2:-}
if [ -z "$image_dir" ]; then
  image_dir=$root/demo/images
  mnt=${mnt:-$root/demo/mnt}
  if [ ! -e "$image_dir/vm1.qcow2" ]; then
    echo "creating a demo chain in $image_dir"
    mkdir -p "$image_dir"
    truncate -s 256M "$image_dir/base.img"
    qemu-io -f raw -c "write -P 0x11 0 64M" "$image_dir/base.img" >/dev/null
    qemu-img create -q -f qcow2 -b base.img -F raw "$image_dir/snap1.qcow2"
    qemu-io -c "write -P 0x22 32M 32M" "$image_dir/snap1.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b snap1.qcow2 -F qcow2 "$image_dir/vm1.qcow2"
    qemu-io -c "write -P 0x33 48M 8M" "$image_dir/vm1.qcow2" >/dev/null
  fi
fi
mnt=${mnt:-$root/demo/mnt}
mkdir -p "$mnt"
if grep -q " $(realpath "$mnt") fuse" /proc/mounts; then
  echo "$mnt is already mounted"
else
  "$root/build/chainfs" "$image_dir" "$mnt"
fi
first=$(ls "$mnt" | head -n 1)
cat <<EOT

chainfs serves $image_dir on $mnt:
$(ls -l "$mnt")

Try:
  getfattr -n user.chainfs.chain --only-values $mnt/$first
  $root/build/chainctl info $mnt/$first
  qemu-img info -f raw $mnt/$first
  $root/build/chainctl snapshot $mnt/$first snap2.qcow2
  $root/build/chainctl commit $mnt/$first --top snap1.qcow2 --wait --verbose
  $root/build/chainctl commit $mnt/$first --active --pivot --verbose
  setfattr -n user.chainfs.commit -v "top=snap1.qcow2 bandwidth=50M" $mnt/$first
  getfattr -n user.chainfs.job --only-values $mnt/$first
  cat $mnt/.control
Unmount with:
  fusermount3 -u $mnt
EOT
