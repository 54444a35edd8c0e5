#!/bin/bash
# The baseline appliance is measured against: a naive Debian live ISO made of stock
# DIB elements only (kernel, QEMU, python3, sshd, live-boot), no trimming, no toram.
# usage: bench/naive-live-iso.sh WORKDIR   (writes WORKDIR/naive.iso; needs `make deps`)
set -eu
work=${1:?usage: bench/naive-live-iso.sh WORKDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work" && cd "$work"
export PATH="$repo/.venv/bin:$PATH"
export DIB_RELEASE=trixie
# The same mirrors appliance build uses: the ones the host's apt uses.
mirrors=$("$repo/.venv/bin/python" -c "from appliance.mirrors import host_mirrors; m = host_mirrors(); print(m.debian, m.security)")
export DIB_DISTRIBUTION_MIRROR=${mirrors% *}
export DIB_DEBIAN_SECURITY_MIRROR=${mirrors#* }
export DIB_DEBOOTSTRAP_CACHE=1 DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=1
rm -rf out iso; mkdir -p out iso/live iso/boot/grub
disk-image-create -a amd64 -t squashfs -o out/naive -p live-boot,live-boot-initramfs-tools,qemu-system-x86,qemu-utils,python3,openssh-server debian-minimal baremetal > build.log 2>&1
cp out/naive.squash iso/live/filesystem.squashfs; cp out/naive.vmlinuz iso/live/vmlinuz; cp out/naive.initrd iso/live/initrd.img
cat > iso/boot/grub/grub.cfg <<'CFG'
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
menuentry naive { linux /live/vmlinuz boot=live console=tty0 console=ttyS0,115200n8 ; initrd /live/initrd.img }
CFG
grub-mkrescue -o naive.iso iso -- -volid NAIVE > /dev/null 2>&1
ls -la naive.iso
