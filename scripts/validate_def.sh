#!/usr/bin/env bash
# Prove an Apptainer definition without Apptainer (not packaged for Debian 12): debootstrap the
# Debian suite its `From: debian:<suite>` names, then replay %files, %post, %environment, %test
# and %runscript in a chroot of a fresh copy of it.  Prints VALIDATE_DEF_OK at the end.
#
#   scripts/validate_def.sh DEF [CONTEXT] [CACHE]
#     DEF      the .def (Bootstrap: docker, From: debian:<suite>[-slim])
#     CONTEXT  folder the %files sources are relative to (default .: build from the repo root)
#     CACHE    cache folder (default .cache/defroot): CACHE/base is the pristine debootstrap
#              (kept between runs), CACHE/work the root the def is replayed in (made anew each run)
#   RUNSCRIPT_ARGS  arguments given to %runscript at the end (default: info)
#   KEEP_WORK=1     keep CACHE/work after a successful replay (removed by default)
#
# Needs root (debootstrap, chroot, mount) and network access to Debian's archive and PyPI.
# Not the same as `apptainer build`: no docker layers (debootstrap --variant=minbase instead of
# the bookworm-slim image), no apptainer-specific environment.  What it proves: the %post
# commands build the stack on that Debian release, %test passes, %runscript runs.
set -euo pipefail

DEF=$(realpath "$1")
CTX=$(realpath "${2:-.}")
CACHE=$(realpath -m "${3:-.cache/defroot}")
RUNSCRIPT_ARGS=${RUNSCRIPT_ARGS:-info}
BASE=$CACHE/base
ROOT=$CACHE/work
T0=$SECONDS

say() { printf '[%s] validate_def: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "ERROR: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"

section() { awk -v s="%$1" '/^%[a-z]+/{on=($1==s); next} on' "$DEF"; }
header()  { awk -v k="$1" 'tolower($1)==tolower(k)":"{sub(/^[^:]*: */, ""); print; exit}' "$DEF"; }
boot=$(header Bootstrap)
from=$(header From)
[[ $boot == docker && $from == debian:* ]] || die "only 'Bootstrap: docker' with 'From: debian:*' is supported"
suite=${from#debian:}
suite=${suite%%-*}                        # debian:bookworm-slim -> bookworm
for s in $(grep -o '^%[a-z]*' "$DEF" | sort -u); do
    case $s in
        %labels|%help|%files|%environment|%post|%test|%runscript) ;;
        *) die "section $s is not replayed by this script" ;;
    esac
done

# ---- unmount and remove the previous work root (never follow a live /dev or /proc mount) ----
release() {
    local m
    for m in dev proc sys; do
        mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
    done
    if grep -q " $ROOT/" /proc/mounts; then
        die "something is still mounted under $ROOT: not removing it"
    fi
    return 0
}
release
rm -rf --one-file-system "$ROOT"

# ---- the base system, debootstrapped once ---------------------------------------------------
if [ ! -f "$BASE/.debootstrap-complete" ]; then
    command -v debootstrap >/dev/null || {
        say "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
    }
    # the archive this machine's apt uses (first URIs line of its deb822 sources)
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "debootstrap --variant=minbase $suite from $mirror into $BASE"
    rm -rf --one-file-system "$BASE"
    debootstrap --variant=minbase "$suite" "$BASE" "$mirror"
    touch "$BASE/.debootstrap-complete"
fi
say "fresh root: copying $BASE to $ROOT"
cp -a "$BASE" "$ROOT"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$ROOT/etc/apt/sources.list.d/"
    rm -f "$ROOT/etc/apt/sources.list"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/hosts "$ROOT/etc/hosts"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/host-ca.pem"     # this host's TLS trust, for pip

mount -t proc proc "$ROOT/proc"
mount -t sysfs -o ro sysfs "$ROOT/sys"      # as Apptainer does: hwloc and UCX read the topology there
mount --rbind /dev "$ROOT/dev"
mount --make-rslave "$ROOT/dev"            # unmounting it later must not propagate to the host
trap 'release || true' EXIT

# ---- %files, then the sections as scripts in the root ----------------------------------------
section files | while read -r src dst; do
    [ -n "${src:-}" ] || continue
    dst=${dst:-$src}
    mkdir -p "$ROOT/$(dirname "$dst")"
    cp -a "$CTX/$src" "$ROOT/$dst"
    say "%files: $src -> $dst"
done
mkdir -p "$ROOT/.singularity.d/env"
section environment > "$ROOT/.singularity.d/env/90-environment.sh"
section post > "$ROOT/.post.sh"
section test > "$ROOT/.test.sh"
section runscript > "$ROOT/.runscript.sh"

in_root() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_CERT=/etc/host-ca.pem "$@"
}
t=$SECONDS
say "=== %post"
in_root /bin/sh -ex /.post.sh
say "%post done in $((SECONDS - t)) s"
t=$SECONDS
say "=== %test"
in_root /bin/sh -ec '. /.singularity.d/env/90-environment.sh; . /.test.sh'
say "%test done in $((SECONDS - t)) s"
say "=== %runscript $RUNSCRIPT_ARGS"
# shellcheck disable=SC2086
in_root /bin/sh -ec '. /.singularity.d/env/90-environment.sh; cd /tmp; exec /bin/sh /.runscript.sh "$@"' \
    runscript $RUNSCRIPT_ARGS
release
if [ "${KEEP_WORK:-0}" = 1 ]; then
    say "kept the replayed root in $ROOT (KEEP_WORK=1)"
else
    rm -rf --one-file-system "$ROOT"
fi
say "total $((SECONDS - T0)) s"
echo "VALIDATE_DEF_OK"
