#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh machine: Python virtualenv with a CPU torch,
# Kyutai's moshi (installed --no-deps: it pins an old torch), this project, and the Debian
# packages the endpoints and their tests need. Re-running is cheap: each stage is skipped
# when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
MOSHI_SPEC=${MOSHI_SPEC:-moshi==0.2.13}
STAMP_DIR=$VENV/.stamps
log() { echo "[setup] $*" >&2; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
# --test (make test): everything the tests use must be there, or set-up fails saying what is
# missing; a test never skips for a missing component. Without it (make run), the server starts
# with what it has (SIP off without pjsua2) and says so.
FOR_TESTS=0
[ "${1:-}" = "--test" ] && FOR_TESTS=1

# --- Debian packages (endpoints, test peers, test signals) -------------------------------
DEB_PKGS=(sip-tester chromium firefox-esr espeak-ng sox libopus0 libsamplerate0 libsrtp2-1 kamailio haproxy redis-server
          systemd)  # systemd: `systemd-analyze verify` checks the shipped unit (tests)
if [ "${SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${DEB_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=""; fi
    if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
      log "installing Debian packages: ${missing[*]}"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    elif [ "$FOR_TESTS" = 1 ]; then
      die "missing Debian packages (${missing[*]}) and no root or sudo to install them: the tests need them"
    else
      log "WARNING: missing Debian packages (${missing[*]}) and no root: SIP test peers/browsers unavailable"
    fi
  fi
  # Debian starts Kamailio's own service on install (listening on *:5060, where `make run`'s SIP
  # endpoint goes): we only run it from the tests and deploy/, never as the system's service.
  if command -v systemctl >/dev/null && systemctl is-enabled kamailio >/dev/null 2>&1; then
    ${SUDO:-} systemctl disable --now kamailio >/dev/null 2>&1 || log "WARNING: could not stop the kamailio service"
  fi
fi

# --- Python virtualenv ---------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
mkdir -p "$STAMP_DIR"
PIP="$VENV/bin/python -m pip"

want="$TORCH_SPEC $MOSHI_SPEC"
if [ "$(cat "$STAMP_DIR/base" 2>/dev/null)" != "$want" ]; then
  # torch first and alone, so that nothing later can pull a different (CUDA) build.
  log "installing $TORCH_SPEC"
  $PIP install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  log "installing $MOSHI_SPEC (--no-deps: it pins torch<2.10)"
  $PIP install -q --no-deps "$MOSHI_SPEC"
  echo "$want" > "$STAMP_DIR/base"
fi

proj_hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP_DIR/project" 2>/dev/null)" != "$proj_hash" ]; then
  log "installing the project and its test tools"
  # The constraint keeps pip from replacing the torch installed above.
  tv=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
  echo "torch==$tv" > "$STAMP_DIR/constraints.txt"
  $PIP install -q -c "$STAMP_DIR/constraints.txt" -e ".[test]"
  echo "$proj_hash" > "$STAMP_DIR/project"
fi

# --- pjsua2 (SIP endpoint): built from Debian's pjproject source, cached -------------------
if [ "${SKIP_PJSUA2:-0}" != 1 ] && [ -x scripts/build_pjsua2.sh ]; then
  if ! scripts/build_pjsua2.sh "$VENV"; then
    [ "$FOR_TESTS" = 1 ] && die "the pjsua2 build failed (scripts/build_pjsua2.sh): the SIP tests need it"
    log "WARNING: pjsua2 build failed; the server runs without its SIP endpoint"
  fi
fi
log "ready: $VENV"
