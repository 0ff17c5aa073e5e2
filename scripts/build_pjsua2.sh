#!/usr/bin/env bash
# Build PJSIP's own Python binding (pjsua2, SWIG) from Debian's pjproject source and install it
# into the project's virtualenv. PyPI has no usable pjsua2 (the sdist needs a built pjproject,
# pjsua2-pybind11 lacks AudioMediaPort). Debian unstable's `asterisk` source package carries the
# full pjproject as its `Xpjproject` component; we fetch it with a private apt configuration
# (the system's sources are left alone), build it once (~4 min on 2 cores) and cache the result,
# keyed by pjproject version, so later runs only copy two files.
#
# It also builds the SIP call port (telephony/sip/native/call_port.c) against the same pjproject:
# the headers and compile flags are kept in the cache beside the module, so a change to the port
# rebuilds only the port (a second), keyed by the hash of its source.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV=${1:-"$ROOT/.venv"}
PY="$VENV/bin/python"
PORT_SRC="$ROOT/telephony/sip/native/call_port.c"
PORT_HASH=$(sha256sum "$PORT_SRC" | cut -c1-16)
CACHE=${PERSONAPLEX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/personaplex-agent}/pjsua2
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "[pjsua2] $*" >&2; }
die() { echo "[pjsua2] ERROR: $*" >&2; exit 1; }

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
PORT_SO="$SITE/personaplex_call_port.so"  # where telephony/sip/port.py looks for it
port_current() { [ -f "$PORT_SO" ] && [ "$(cat "$SITE/personaplex_call_port.hash" 2>/dev/null)" = "$PORT_HASH" ]; }
# build_port DIR: compile the call port with the headers and flags kept in DIR (a cache entry)
build_port() {
  local dir=$1
  [ -f "$dir/cflags" ] || return 1
  # shellcheck disable=SC2046
  gcc -shared -fPIC -O2 -Wall -Werror $(sed "s|@INC@|$dir/include|g" "$dir/cflags") \
    -o "$PORT_SO.tmp" "$PORT_SRC" -lm -lpthread || die "the SIP call port does not compile"
  mv "$PORT_SO.tmp" "$PORT_SO"
  echo "$PORT_HASH" > "$SITE/personaplex_call_port.hash"
  log "SIP call port built ($PORT_HASH)"
}

if "$PY" -c 'import pjsua2' 2>/dev/null && port_current; then exit 0; fi
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# 1. Already built for this Python? Copy from the cache (and build the port from its headers).
installed=$(ls -d "$CACHE"/*/"$PYTAG" 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$installed" ] && [ -f "$installed/pjsua2.py" ] && [ -f "$installed/../cflags" ]; then
  cp "$installed"/pjsua2.py "$installed"/_pjsua2*.so "$SITE"/
  if "$PY" -c 'import pjsua2'; then
    port_current || build_port "$(dirname "$installed")"
    log "installed from cache $installed"
    exit 0
  fi
fi

# 2. Build dependencies (Debian packages).
BUILD_DEPS=(build-essential swig pkg-config libsrtp2-dev libopus-dev libssl-dev uuid-dev libsamplerate0-dev dpkg-dev xz-utils)
missing=()
for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "need root (or install: ${missing[*]})"
  log "installing build packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 3. Fetch the pjproject source from Debian unstable's asterisk package (private apt config).
WORK=$(mktemp -d /tmp/pjsua2-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
APTDIR="$WORK/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/archives/partial" "$APTDIR/sources.list.d"
echo "deb-src $MIRROR unstable main" > "$APTDIR/sources.list"
APT_OPTS=(-o "Dir::Etc::sourcelist=$APTDIR/sources.list" -o "Dir::Etc::sourceparts=$APTDIR/sources.list.d"
          -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache::archives=$APTDIR/archives"
          -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1")
log "fetching the pjproject source (Debian unstable, source package asterisk)"
apt-get "${APT_OPTS[@]}" update -qq >/dev/null 2>"$WORK/apt.err" || die "apt update of $MIRROR unstable failed: $(tail -n 3 "$WORK/apt.err")"
( cd "$WORK" && apt-get "${APT_OPTS[@]}" source --download-only asterisk >/dev/null 2>"$WORK/src.err" ) \
  || die "cannot download the asterisk source package: $(tail -n 3 "$WORK/src.err")"
TARBALL=$(ls "$WORK"/asterisk_*.orig-Xpjproject.tar.* 2>/dev/null | head -n 1)
[ -n "$TARBALL" ] || die "the asterisk source package has no Xpjproject component"
mkdir -p "$WORK/src"
tar -xf "$TARBALL" -C "$WORK/src"
SRC=$(dirname "$(find "$WORK/src" -maxdepth 3 -name configure -path '*pjproject*' | head -n 1)")
[ -d "$SRC/pjsip-apps/src/swig/python" ] || die "pjproject source lacks the SWIG Python binding"
ver() { sed -n "s/^export $1 *:= *\([0-9]*\).*/\1/p" "$SRC/version.mak" | head -n 1; }
VERSION="$(ver PJ_VERSION_MAJOR).$(ver PJ_VERSION_MINOR)"
[ -n "$(ver PJ_VERSION_REV)" ] && VERSION="$VERSION.$(ver PJ_VERSION_REV)"
[ "$VERSION" != "." ] || VERSION=unknown
log "building pjproject $VERSION (about 4 minutes)"

# 4. Configure without what Debian stripped from the tarball, with a resampler.
cd "$SRC"
sed -i 's/[^ ]*bdimad_dev\.o//g' pjmedia/build/Makefile
export CFLAGS="-fPIC -O2" CXXFLAGS="-fPIC -O2"
./configure --disable-sound --disable-video --disable-v4l2 --disable-ffmpeg --disable-openh264 --disable-vpx \
  --disable-gsm-codec --disable-ilbc-codec --disable-speex-codec --disable-speex-aec --disable-g7221-codec \
  --disable-webrtc --disable-webrtc-aec3 --disable-libyuv --disable-libwebrtc --disable-sdl --disable-bcg729 \
  --disable-silk --disable-lyra --disable-android-mediacodec --disable-darwin-ssl --disable-upnp \
  --with-external-srtp --enable-libsamplerate > "$WORK/configure.log" 2>&1 \
  || die "configure failed: $(tail -n 20 "$WORK/configure.log")"
cat > pjlib/include/pj/config_site.h <<'CFG'
#define PJ_HAS_SSL_SOCK 1
#define PJMEDIA_HAS_VIDEO 0
#define PJSUA_MAX_CALLS 256
#define PJ_IOQUEUE_MAX_HANDLES 1024
#define PJSUA_MAX_PLAYERS 256
#define PJSUA_MAX_RECORDERS 256
#define PJSUA_MAX_CONF_PORTS (PJSUA_MAX_CALLS+2*PJSUA_MAX_PLAYERS)
CFG
make dep -j"$(nproc)" > "$WORK/dep.log" 2>&1 || die "make dep failed: $(tail -n 20 "$WORK/dep.log")"
make -j"$(nproc)" > "$WORK/make.log" 2>&1 || die "make failed: $(tail -n 30 "$WORK/make.log")"

# 5. The SWIG binding, built by our venv's Python.
cd pjsip-apps/src/swig/python
PATH="$VENV/bin:$PATH" make PYTHON="$PY" > "$WORK/swig.log" 2>&1 || die "pjsua2 binding build failed: $(tail -n 30 "$WORK/swig.log")"
SO=$(find . -name '_pjsua2*.so' | head -n 1)
[ -n "$SO" ] || die "no _pjsua2 module was produced"
OUT="$CACHE/$VERSION/$PYTAG"
mkdir -p "$OUT"
cp "$SO" pjsua2.py "$OUT"/
cp "$OUT"/pjsua2.py "$OUT"/_pjsua2*.so "$SITE"/
# headers and flags for the call port (pjproject's own APP_CFLAGS, pointed at the cached headers)
rm -rf "$CACHE/$VERSION/include"
mkdir -p "$CACHE/$VERSION/include"
for lib in pjlib pjlib-util pjnath pjmedia pjsip; do cp -r "$SRC/$lib/include" "$CACHE/$VERSION/include/$lib"; done
printf 'include build.mak\nprint-cflags:\n\t@echo $(APP_CFLAGS)\n' > "$WORK/cflags.mk"
make -s -C "$SRC" -f "$WORK/cflags.mk" print-cflags | sed "s|$SRC/*\([a-z-]*\)/include|@INC@/\1|g" > "$CACHE/$VERSION/cflags"
build_port "$CACHE/$VERSION"
"$PY" -c 'import pjsua2; ep = pjsua2.Endpoint(); ep.libCreate(); print("pjsua2", ep.libVersion().full); ep.libDestroy()' >&2 \
  || die "the built module does not import"
log "pjsua2 $VERSION built and cached in $OUT"
