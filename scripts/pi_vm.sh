#!/usr/bin/env bash
# The arm64 Raspberry Pi stand-in (research: emulation.md §6(a)): a Debian bookworm arm64 full-system VM
# (qemu-system-aarch64 -M virt -cpu cortex-a72) reached over a real sshd on 127.0.0.1, with two TFLite runtimes:
#   /opt/litert  ai-edge-litert (+ numpy 2 from the wheel's deps)    PYTHONPATH=/opt/litert
#   /opt/tflrt   tflite-runtime 2.14.0 (Debian's numpy 1.24)          PYTHONPATH=/opt/tflrt
#
#   scripts/pi_vm.sh start    build once (~4 min, needs root: apt, debootstrap, binfmt), then boot and wait for ssh
#   scripts/pi_vm.sh build    only build (idempotent: each finished step leaves a stamp under .pi/)
#   scripts/pi_vm.sh stop     power the guest off (sysrq o), kill qemu if it does not exit
#   scripts/pi_vm.sh status   exit 0 if the VM answers ssh
#
# Everything lives under $PI_DIR (default <repo>/.pi): rootfs/, initrd.cpio, the kernel, the client key `key`, the
# guest's host key (generated here and baked into the image, so clients keep host key verification on),
# known_hosts pinned to it, and targets.yaml with two targets (pi-litert, pi-tflrt) for `device_bench --targets-file`.
# Knobs: PI_PORT (2226), PI_MEM_MB (2048), PI_SMP (2), PI_CPU (cortex-a72; cortex-a76 for a Pi 5),
# PI_BOOT_TIMEOUT (300 s), PI_PYTHON (the host python whose pip fetches the aarch64 wheels).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${PI_DIR:-$ROOT/.pi}
PORT=${PI_PORT:-2226}
MEM=${PI_MEM_MB:-2048}
SMP=${PI_SMP:-2}
CPU=${PI_CPU:-cortex-a72}
BOOT_TIMEOUT=${PI_BOOT_TIMEOUT:-300}
HOST_PY=${PI_PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
SUITE=bookworm
MODULES="failover net_failover virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_net"

say() { printf 'pi-vm: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
now() { date +%s; }

ssh_guest() {
    ssh -p "$PORT" -i "$W/key" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
        -o UserKnownHostsFile="$W/known_hosts" -o ConnectTimeout=10 -o LogLevel=ERROR root@127.0.0.1 "$@"
}

qemu_pid() {  # the pid of our qemu, if it is running
    [ -f "$W/vm.pid" ] || return 1
    local pid
    pid=$(cat "$W/vm.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q qemu-system-aarch64 "/proc/$pid/cmdline" 2>/dev/null \
        && echo "$pid"
}

need_root() { [ "$(id -u)" = 0 ] || die "building the VM needs root (apt-get, debootstrap, binfmt_misc, chroot)"; }

install_host_packages() {
    local missing=()
    command -v qemu-system-aarch64 >/dev/null || missing+=(qemu-system-arm)
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # binfmt_misc is not mounted without systemd; F (fix-binary) lets chroot run arm64 without copying qemu in.
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt_misc has no qemu-aarch64 entry (update-binfmts failed)"
}

build() {
    [ -f "$W/built" ] && return 0
    need_root
    local t0
    t0=$(now)
    mkdir -p "$W"
    install_host_packages
    local mirror
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}

    if [ ! -f "$W/stamp.rootfs" ]; then
        say "debootstrap arm64 $SUITE from $mirror (~2.5 min)"
        rm -rf "$W/rootfs"
        debootstrap --arch=arm64 --variant=minbase \
            --include=python3,python3-numpy,libstdc++6,openssh-server,kmod,iproute2 \
            "$SUITE" "$W/rootfs" "$mirror" >"$W/debootstrap.log" 2>&1 \
            || die "debootstrap failed (log: $W/debootstrap.log)"
        touch "$W/stamp.rootfs"
    fi

    if [ ! -f "$W/stamp.wheels" ]; then
        say "installing aarch64 wheels: ai-edge-litert -> /opt/litert, tflite-runtime==2.14.0 -> /opt/tflrt"
        local plat=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
        for g in 2014 _2_17 _2_27 _2_28 _2_34 _2_36; do plat+=(--platform "manylinux${g}_aarch64"); done
        rm -rf "$W/rootfs/opt/litert" "$W/rootfs/opt/tflrt"
        "$HOST_PY" -m pip install -q --disable-pip-version-check --no-warn-conflicts --target "$W/rootfs/opt/litert" "${plat[@]}" \
            ai-edge-litert==2.3.0 numpy==2.4.6
        # tflite-runtime 2.14 breaks on numpy 2: it uses the guest's Debian numpy 1.24.
        "$HOST_PY" -m pip install -q --disable-pip-version-check --no-warn-conflicts --no-deps --target "$W/rootfs/opt/tflrt" "${plat[@]}" \
            tflite-runtime==2.14.0
        touch "$W/stamp.wheels"
    fi

    if [ ! -f "$W/stamp.kernel" ]; then
        say "fetching Debian's arm64 kernel"
        rm -rf "$W/kernel" "$W/rootfs/tmp/"linux-image-*.deb
        chroot "$W/rootfs" sh -c 'cd /tmp && apt-get download -qq $(apt-cache depends linux-image-arm64 \
            | awk "/Depends: linux-image-6/{print \$2}")'
        dpkg -x "$W/rootfs/tmp/"linux-image-*.deb "$W/kernel"
        rm -f "$W/rootfs/tmp/"linux-image-*.deb
        touch "$W/stamp.kernel"
    fi
    local kv
    kv=$(ls "$W/kernel/lib/modules")
    mkdir -p "$W/rootfs/lib/modules/$kv/extra"
    for m in $MODULES; do
        cp "$(find "$W/kernel/lib/modules" -name "$m.ko" | head -1)" "$W/rootfs/lib/modules/$kv/extra/"
    done

    # Keys: the client key logs in as root; the guest's only host key is generated here and pinned in known_hosts.
    [ -f "$W/key" ] || ssh-keygen -q -t ed25519 -N '' -C edgesr-pi-vm-client -f "$W/key"
    [ -f "$W/host_key" ] || ssh-keygen -q -t ed25519 -N '' -C edgesr-pi-vm-host -f "$W/host_key"
    install -d -m 700 "$W/rootfs/root/.ssh"
    install -m 600 "$W/key.pub" "$W/rootfs/root/.ssh/authorized_keys"
    rm -f "$W/rootfs/etc/ssh/"ssh_host_*
    install -m 600 "$W/host_key" "$W/rootfs/etc/ssh/ssh_host_ed25519_key"
    install -m 644 "$W/host_key.pub" "$W/rootfs/etc/ssh/ssh_host_ed25519_key.pub"
    cat >"$W/rootfs/etc/ssh/sshd_config.d/edgesr.conf" <<EOF
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
EOF
    echo "edgesr-pi" >"$W/rootfs/etc/hostname"
    cat >"$W/rootfs/init" <<EOF
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run/sshd /tmp; mount -t devpts devpts /dev/pts; chmod 1777 /tmp
hostname edgesr-pi
for m in $MODULES; do insmod /lib/modules/$kv/extra/\$m.ko; done
IF=\$(ls /sys/class/net | grep -v lo | head -1); ip link set lo up; ip link set \$IF up
ip addr add 10.0.2.15/24 dev \$IF
exec /usr/sbin/sshd -D -e
EOF
    chmod +x "$W/rootfs/init"

    say "packing the rootfs as the initramfs"
    (cd "$W/rootfs" && find . -xdev \( -path ./var/cache/apt/archives -o -path ./var/lib/apt/lists \
        -o -path ./proc -o -path ./sys -o -path ./dev \) -prune -o -print \
        | cpio -o -H newc --quiet >"$W/initrd.cpio.tmp" \
        && printf '%s\n' proc sys dev | cpio -o -H newc --quiet --append -O "$W/initrd.cpio.tmp")
    mv "$W/initrd.cpio.tmp" "$W/initrd.cpio"
    write_targets
    touch "$W/built"
    say "built in $(($(now) - t0)) s"
}

target_entry() { # name runtime site-packages-dir: one ssh target of the stand-in
    cat <<EOF
  $1:
    type: ssh
    host: 127.0.0.1
    port: $PORT
    user: root
    identity: key
    known_hosts: known_hosts
    python: python3
    runtime: $2
    env: {PYTHONPATH: $3}
    timeout_s: 1800
    connect_timeout_s: 10
    emulated: true
EOF
}

write_targets() {
    printf '[127.0.0.1]:%s %s\n' "$PORT" "$(cut -d' ' -f1-2 "$W/host_key.pub")" >"$W/known_hosts"
    {
        echo "# The arm64 VM stand-in (scripts/pi_vm.sh). Paths are relative to this file."
        echo "# Emulated: outputs and memory are real, timings are not meaningful."
        echo "targets:"
        target_entry pi-litert ai-edge-litert /opt/litert
        target_entry pi-tflrt tflite-runtime /opt/tflrt
    } >"$W/targets.yaml.tmp"
    mv "$W/targets.yaml.tmp" "$W/targets.yaml"
}

wait_for_ssh() {
    local deadline=$(($(now) + BOOT_TIMEOUT))
    until ssh_guest true 2>/dev/null; do
        qemu_pid >/dev/null || die "qemu exited (console: $W/console.log)"
        [ "$(now)" -lt "$deadline" ] || die "no ssh after ${BOOT_TIMEOUT} s (console: $W/console.log)"
        sleep 1
    done
}

start() {
    build
    write_targets  # PI_PORT may differ from the build's
    if qemu_pid >/dev/null; then
        wait_for_ssh
        say "already running on 127.0.0.1:$PORT; targets: $W/targets.yaml"
        return 0
    fi
    local t0 kernel
    t0=$(now)
    kernel=$(ls "$W/kernel/boot/"vmlinuz-* | head -1)
    rm -f "$W/vm.pid"
    qemu-system-aarch64 -M virt -cpu "$CPU" -smp "$SMP" -m "$MEM" -kernel "$kernel" -initrd "$W/initrd.cpio" \
        -append "console=ttyAMA0 rdinit=/init quiet" -display none -serial "file:$W/console.log" -no-reboot \
        -daemonize -pidfile "$W/vm.pid" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0,romfile= \
        || die "qemu-system-aarch64 failed to start (is 127.0.0.1:$PORT free?)"
    wait_for_ssh
    say "up: ssh root@127.0.0.1 -p $PORT ($(($(now) - t0)) s from qemu start); targets: $W/targets.yaml"
}

stop() {
    local pid
    if ! pid=$(qemu_pid); then
        rm -f "$W/vm.pid"
        say "not running"
        return 0
    fi
    ssh_guest 'echo o > /proc/sysrq-trigger' >/dev/null 2>&1 || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        say "guest did not power off; killing qemu $pid"
        kill "$pid" 2>/dev/null || true
        sleep 1
    fi
    rm -f "$W/vm.pid"
    say "stopped"
}

case "${1:-start}" in
    build) build ;;
    start) start ;;
    stop) stop ;;
    status) qemu_pid >/dev/null && ssh_guest true 2>/dev/null && say "running on 127.0.0.1:$PORT" ;;
    -h | --help | help) sed -n '2,18p' "$0" ;;
    *) die "unknown command '$1' (build, start, stop, status)" ;;
esac
