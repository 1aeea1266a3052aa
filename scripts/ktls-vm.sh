#!/usr/bin/env bash
# Run a command inside a throwaway KVM guest booted on Debian bookworm's own
# kernel (linux-image-amd64, 6.1, CONFIG_TLS=m), for testing kernel TLS (kTLS)
# on hosts whose kernel has no `tls` ULP.
#
#   bash scripts/ktls-vm.sh <command...>      (e.g. from /work/main)
#
# The guest sees the host's whole root filesystem live over 9p (read-write: files
# written outside /tmp, /run and /dev/shm land on the host), with private tmpfs on
# /tmp, /run and /dev/shm (unix sockets do not work on 9p), loopback only, no other
# network (a working directory under /tmp stays visible). The command runs as root
# in the caller's working directory with a clean
# environment (HOME=/root, PATH incl. pyenv shims); use `env VAR=... cmd` to pass more.
# Its stdout+stderr stream to our stdout; we exit with its exit code, or with 124
# on timeout (KTLS_VM_TIMEOUT, default 900 s) / 125 if the guest itself failed.
#
# Needs root (apt-get, /dev/kvm). Cache: KTLS_VM_CACHE (default
# /var/cache/conduit-ktls-vm): kernel tree (~400 MB) + busybox + initramfs.
# Other knobs: KTLS_VM_ACCEL=auto|kvm|tcg, KTLS_VM_BOOT_TIMEOUT (KVM boot watchdog,
# default 10 s), KTLS_VM_DEBUG=1 (show the guest console afterwards).
set -euo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 <command...>" >&2
    exit 2
fi

CACHE=${KTLS_VM_CACHE:-/var/cache/conduit-ktls-vm}
TIMEOUT=${KTLS_VM_TIMEOUT:-900}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

log() { echo "ktls-vm: $*" >&2; }
die() { log "error: $*"; exit 125; }

mkdir -p "$CACHE"
# Serialise setup between concurrent runs; released before the guest boots.
exec 9>"$CACHE/.lock"
flock 9

apt_quiet() {
    DEBIAN_FRONTEND=noninteractive apt-get -q -y "$@" >>"$CACHE/apt.log" 2>&1
}

if ! command -v qemu-system-x86_64 >/dev/null; then
    log "installing qemu-system-x86 (log: $CACHE/apt.log)"
    apt_quiet install --no-install-recommends qemu-system-x86 ||
        { apt_quiet update && apt_quiet install --no-install-recommends qemu-system-x86; } ||
        die "apt-get install qemu-system-x86 failed, see $CACHE/apt.log"
fi

# Download a .deb and unpack it into $2 without installing it on the host.
fetch_deb() {
    local pkg=$1 dest=$2 dl
    dl=$(mktemp -d "$CACHE/dl.XXXXXX")
    if ! (cd "$dl" && apt_quiet download "$pkg"); then
        apt_quiet update || true
        (cd "$dl" && apt_quiet download "$pkg") || { rm -rf "$dl"; die "apt-get download $pkg failed, see $CACHE/apt.log"; }
    fi
    rm -rf "$dest.tmp"
    dpkg-deb -x "$dl"/*.deb "$dest.tmp"
    rm -rf "$dl"
}

# The kernel the linux-image-amd64 metapackage currently points to.
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[^ ]*-amd64\)$/\1/p' | head -n1
}
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ]; then
    apt_quiet update || true
    KPKG=$(kernel_pkg)
fi
if [ -z "$KPKG" ]; then  # no usable apt lists: make do with a cached kernel
    cached=$(ls -d "$CACHE"/*-amd64/.complete 2>/dev/null | tail -n1)
    [ -n "$cached" ] || die "cannot resolve linux-image-amd64's kernel package (apt-cache depends linux-image-amd64)"
    cached=${cached%/.complete}
    KPKG=linux-image-${cached##*/}
fi
KVER=${KPKG#linux-image-}
KDIR=$CACHE/$KVER

BB=$CACHE/busybox/bin/busybox
if [ ! -x "$BB" ]; then
    log "fetching busybox-static"
    fetch_deb busybox-static "$CACHE/busybox"
    rm -rf "$CACHE/busybox" && mv "$CACHE/busybox.tmp" "$CACHE/busybox"
fi

if [ ! -e "$KDIR/.complete" ]; then
    log "fetching $KPKG"
    fetch_deb "$KPKG" "$KDIR"
    # The package ships no modules.dep (depmod runs at install time); busybox's
    # depmod writes it, plus modules.alias for the guest's on-demand autoload.
    "$BB" depmod -b "$KDIR.tmp" "$KVER"
    # Unpacked vmlinux, booted via its PVH entry: skips the xz self-decompression,
    # which alone takes ~4 s under TCG. Best effort; the bzImage works too.
    if grep -q '^CONFIG_PVH=y' "$KDIR.tmp/boot/config-$KVER"; then
        off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$KDIR.tmp/boot/vmlinuz-$KVER" | head -n1 | cut -d: -f1)
        if [ -n "$off" ]; then
            tail -c +$((off + 1)) "$KDIR.tmp/boot/vmlinuz-$KVER" | xz -dc >"$KDIR.tmp/vmlinux" 2>/dev/null || :
            [ "$(head -c4 "$KDIR.tmp/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] || rm -f "$KDIR.tmp/vmlinux"
        fi
    fi
    touch "$KDIR.tmp/.complete"
    rm -rf "$KDIR" && mv "$KDIR.tmp" "$KDIR"
    # Older kernels are dead weight (~400 MB each) once the metapackage moved on.
    find "$CACHE" -mindepth 1 -maxdepth 1 -type d -name '*-amd64' ! -name "$KVER" -exec rm -rf {} +
fi
KERNEL=$KDIR/boot/vmlinuz-$KVER
[ -f "$KDIR/vmlinux" ] && KERNEL=$KDIR/vmlinux
MODDIR=$KDIR/lib/modules/$KVER
[ -f "$KERNEL" ] && [ -f "$MODDIR/modules.dep" ] || die "incomplete kernel cache in $KDIR (remove it and retry)"

# The initramfs depends on this script (its /init is below): rebuild when it changes.
INITRD=$KDIR/initrd-$(sha256sum "$SELF" | cut -c1-16).gz
if [ ! -f "$INITRD" ]; then
    log "building initramfs"
    stage=$(mktemp -d "$CACHE/initrd.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,newroot,lib/modules/"$KVER"}
    cp "$BB" "$stage/bin/busybox"

    # Modules to boot with, dependencies first (order resolved from modules.dep).
    declare -A DEPS=() PATHOF=() SEEN=()
    while IFS=: read -r path deps; do
        name=${path##*/}; name=${name%.ko*}
        PATHOF[$name]=$path
        DEPS[$name]=$deps
    done <"$MODDIR/modules.dep"
    ORDER=()
    add_mod() {
        local name=$1 d
        [ -n "${SEEN[$name]:-}" ] && return
        SEEN[$name]=1
        [ -n "${PATHOF[$name]:-}" ] || die "module $name not in $MODDIR/modules.dep"
        for d in ${DEPS[$name]}; do
            d=${d##*/}; add_mod "${d%.ko*}"
        done
        ORDER+=("$name")
    }
    for m in virtio_pci virtio_console 9pnet_virtio 9p tls; do add_mod "$m"; done
    for m in "${ORDER[@]}"; do
        src=$MODDIR/${PATHOF[$m]}
        case $src in  # busybox insmod wants plain .ko
            *.xz) xz -dc "$src" >"$stage/lib/modules/$KVER/$m.ko" ;;
            *.zst) zstd -qdc "$src" >"$stage/lib/modules/$KVER/$m.ko" ;;
            *.gz) gzip -dc "$src" >"$stage/lib/modules/$KVER/$m.ko" ;;
            *) cp "$src" "$stage/lib/modules/$KVER/$m.ko" ;;
        esac
        echo "$m.ko" >>"$stage/modules.load"
    done
    printf 'KVER=%s\nKDIR=%s\n' "$KVER" "$KDIR" >"$stage/ktls-vm.env"

    cat >"$stage/init" <<'INIT'
#!/bin/busybox sh
# PID 1. It never chroots itself: the kernel's module-autoload helper
# (/sbin/modprobe) runs with PID 1's root, so it must keep seeing /lib/modules.
/bin/busybox --install -s
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 >/proc/sys/kernel/printk  # keep kernel chatter off the console
. /ktls-vm.env

fail() {
    echo "ktls-vm-init: $*"
    sync
    poweroff -f
    echo o >/proc/sysrq-trigger
    sleep 10
}

while read -r m; do
    insmod "/lib/modules/$KVER/$m" || fail "insmod $m failed"
done </modules.load

R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot $R ||
    fail "mounting the host root over 9p failed"
# The full module tree from the host cache, so e.g. gcm(aes) autoloads when kTLS keys are set.
mount --bind "$R$KDIR/lib/modules" /lib/modules || fail "bind-mounting the module tree failed"

RUN=$(sed -n 's/.* ktls_run=\([^ ]*\).*/\1/p' /proc/cmdline)
cp "$R$RUN/cmd" /cmd || fail "cannot read the command file $RUN/cmd"

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# A working directory under /tmp (a CI checkout) stays the host's: its top folder
# under /tmp is bound again over the private /tmp.
CWD=$(cat "$R$RUN/cwd")
case $CWD in /tmp/?*)
    top=${CWD#/tmp/}; top=${top%%/*}
    mkdir -p /hosttmp
    mount --bind "$R/tmp/$top" /hosttmp || fail "bind-mounting /tmp/$top failed" ;;
esac
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
if [ -d /hosttmp ]; then
    mkdir -p "$R/tmp/$top"
    mount --bind /hosttmp "$R/tmp/$top" || fail "bind-mounting /tmp/$top failed"
fi
# Fresh /run, but with the host's directory skeleton (e.g. /run/lock, /run/user).
(cd $R/run && find . -mindepth 1 -type d) >/run-dirs 2>/dev/null || :
mount -t tmpfs -o mode=755 tmpfs $R/run
while read -r d; do
    mkdir -p "$R/run/$d"
done </run-dirs
chmod 1777 $R/run/lock 2>/dev/null || :
cp /cmd $R/tmp/.ktls-vm-cmd

ip link set lo up  # 127.0.0.1/8 and ::1
[ -s $R/etc/hostname ] && hostname "$(cat $R/etc/hostname)"
ulimit -n 65536

# The command's output goes to a virtio console (a tty, raw: byte-exact, and far
# faster than a UART), straight to the host's stdout; this console (ttyS0) only
# carries boot noise and the markers. Kept open: hvc resets its termios on last close.
exec 3<>/dev/hvc0
stty raw -echo <&3
echo "@@KTLS-VM-BOOTED@@"
chroot $R /usr/bin/env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash \
    PATH=/root/.pyenv/shims:/root/.pyenv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 TERM=dumb \
    /bin/bash /tmp/.ktls-vm-cmd </dev/null >&3 2>&3 3>&-
rc=$?
sync
echo "@@KTLS-VM-EXIT=$rc@@"
poweroff -f
echo o >/proc/sysrq-trigger
sleep 10
INIT
    chmod 755 "$stage/init"
    (cd "$stage" && find . | "$BB" cpio -o -H newc 2>/dev/null | gzip -1) >"$INITRD.tmp"
    rm -rf "$stage"
    rm -f "$KDIR"/initrd-*.gz
    mv "$INITRD.tmp" "$INITRD"
fi
exec 9>&-  # setup done: let concurrent runs proceed

RUN=$(mktemp -d /tmp/ktls-vm.XXXXXX)
trap 'rm -rf "$RUN"' EXIT
# The command travels as a file read over 9p, quoted for bash, not on the kernel cmdline.
{
    # pyenv's shims are bash scripts that fork a dozen processes, seconds under TCG:
    # put the version they would pick here in front of them.
    if pyver=$(pyenv version-name 2>/dev/null) && pybin=$(pyenv root)/versions/$pyver/bin &&
        [ -d "$pybin" ]; then
        printf 'PATH=%q:$PATH\n' "$pybin"
    fi
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$RUN/cmd"
printf '%s\n' "$PWD" >"$RUN/cwd"

# KVM when it can boot this kernel, else TCG. /dev/kvm opening is not enough: e.g.
# a PVM-only host KVM (kvm_pvm, as on Firecracker sandboxes) only runs PVM-built
# guest kernels and hangs on Debian's. So a KVM boot must show life within
# KTLS_VM_BOOT_TIMEOUT s, else we fall back; the verdict is cached per host kernel.
NOKVM=$CACHE/no-kvm.$(uname -r)
ACCELS=()
case ${KTLS_VM_ACCEL:-auto} in
    kvm) ACCELS=(kvm) ;;
    tcg) ACCELS=(tcg) ;;
    *)
        if [ -e "$NOKVM" ]; then
            :
        elif (exec 3<>/dev/kvm) 2>/dev/null; then
            ACCELS=(kvm)
        fi
        ACCELS+=(tcg)
        ;;
esac

qpid=
stop_guest() {  # qemu is a grandchild (subshell, timeout): kill it by its pidfile
    if [ -s "$RUN/qemu.pid" ]; then kill "$(cat "$RUN/qemu.pid")" 2>/dev/null || :; fi
    if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || :; fi
}
trap 'stop_guest; rm -rf "$RUN"' EXIT
# Explicit traps so a signal interrupts `wait` at once (and the EXIT trap then
# stops the guest) instead of bash waiting for qemu to finish first.
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
deadline=$((SECONDS + TIMEOUT))
booted=
for accel in "${ACCELS[@]}"; do
    if [ "$accel" = kvm ]; then
        opts=(-enable-kvm -cpu host)
        boot_limit=${KTLS_VM_BOOT_TIMEOUT:-10}
    else
        if [ "${KTLS_VM_ACCEL:-auto}" != tcg ]; then
            log "using TCG emulation (slow): no KVM here that boots this kernel"
        fi
        opts=(-accel tcg,thread=multi -cpu max)
        boot_limit=$TIMEOUT
    fi
    : >"$RUN/console.log"
    rm -f "$RUN/qemu.pid"
    # Not -nographic: that puts the console and monitor on stdio, and we want stdio
    # to carry only the command's output (the virtio console).
    # (in a subshell so that bash's "Aborted"-style job notices also go to qemu.log)
    left=$((deadline - SECONDS)); [ "$left" -gt 0 ] || left=1
    (timeout --foreground -k 10 "$left" qemu-system-x86_64 \
        "${opts[@]}" -m 4096 -smp 2 \
        -nodefaults -no-user-config -display none -no-reboot -pidfile "$RUN/qemu.pid" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 quiet panic=-1 mitigations=off ktls_run=$RUN" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap \
        -serial file:"$RUN/console.log" \
        -device virtio-serial-pci,max_ports=1 \
        -chardev stdio,id=out,signal=off -device virtconsole,chardev=out \
        </dev/null; exit $?) 2>"$RUN/qemu.log" &
    qpid=$!
    boot_deadline=$((SECONDS + boot_limit))
    while kill -0 "$qpid" 2>/dev/null && ! grep -q '@@KTLS-VM-BOOTED@@' "$RUN/console.log"; do
        [ "$SECONDS" -lt "$boot_deadline" ] || { stop_guest; break; }
        sleep 0.2
    done
    if grep -q '@@KTLS-VM-BOOTED@@' "$RUN/console.log"; then
        booted=$accel
        break
    fi
    wait "$qpid" 2>/dev/null || :
    qpid=
    if [ "$accel" = kvm ] && [ "${KTLS_VM_ACCEL:-auto}" = auto ]; then
        touch "$NOKVM"
    fi
done

qrc=0
if [ -n "$qpid" ]; then
    wait "$qpid" || qrc=$?
    qpid=
fi

if [ -n "${KTLS_VM_DEBUG:-}" ]; then
    log "--- guest console ($booted) ---"
    tr -d '\r' <"$RUN/console.log" >&2
    cat "$RUN/qemu.log" >&2
fi
rc=$(tr -d '\r' <"$RUN/console.log" | sed -n 's/^@@KTLS-VM-EXIT=\([0-9]*\)@@$/\1/p' | tail -n1)
if [ -n "$rc" ]; then
    exit "$rc"
fi
if [ -z "$booted" ]; then
    log "error: the guest failed to boot (tried: ${ACCELS[*]})"
    status=125
elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    log "error: timed out after ${TIMEOUT}s (KTLS_VM_TIMEOUT)"
    status=124
else
    log "error: the guest never reported the command's exit code (qemu exit $qrc)"
    status=125
fi
log "--- guest console (tail) ---"
tail -n 40 "$RUN/console.log" | tr -d '\r' >&2 || :
if [ -s "$RUN/qemu.log" ]; then
    log "--- qemu stderr ---"
    tail -n 20 "$RUN/qemu.log" >&2
fi
exit "$status"
