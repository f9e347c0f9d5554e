#!/usr/bin/env bash
# facejax set-up and entry points (safe to rerun).
#   ./run.sh demo   set up .venv, then train -> export -> index -> evaluate -> report on Fashion-MNIST
#   ./run.sh serve  set up .venv, then serve runs/demo (after ./run.sh demo) at http://127.0.0.1:8000
#   ./run.sh test   set up .venv with the test extras, then lint and run the whole test suite
#   ./run.sh test --fast   the same without the tests marked slow: a quick check of every package
set -euo pipefail
cd "$(dirname "$0")"

pick_python() {
  for p in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$p" ] || continue
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$p"; return 0
    fi
  done
  echo "facejax needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
}

# Installs the package with the given extras into .venv; skipped when pyproject.toml is unchanged.
setup_venv() {
  local extras="$1"
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  local stamp=".venv/.facejax-installed-${extras//,/-}-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== installing facejax[${extras}] into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[${extras}]"
    touch "$stamp"
  fi
}

# The web page's test drives a real browser: Debian's chromium and its driver.
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium and chromium-driver (apt) for the web page test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || { apt-get update -qq >/dev/null && \
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "== the web page test needs chromium: sudo apt-get install -y chromium chromium-driver" >&2
  fi
}

export KERAS_BACKEND=jax

case "${1:-}" in
  demo)
    setup_venv dev,serve
    shift
    WORKDIR="${WORKDIR:-runs/demo}"
    PY=.venv/bin/python
    $PY scripts/train.py --config configs/demo.py --workdir "$WORKDIR" "$@"
    $PY scripts/export.py --workdir "$WORKDIR"
    $PY scripts/build_index.py --workdir "$WORKDIR"
    $PY scripts/eval_topk.py --workdir "$WORKDIR"
    echo "== done: open $WORKDIR/report/report.html (or report.md); ./run.sh serve to search it"
    ;;
  serve)
    setup_venv dev,serve
    shift
    WORKDIR="${WORKDIR:-runs/demo}"
    if [ ! -f "$WORKDIR/index/manifest.json" ]; then
      echo "no index in $WORKDIR: run ./run.sh demo first (or set WORKDIR=your run)" >&2
      exit 2
    fi
    exec .venv/bin/python scripts/serve.py --workdir "$WORKDIR" "$@"
    ;;
  test)
    setup_venv dev,parity,serve
    shift
    ensure_chromium
    .venv/bin/ruff check facejax scripts configs tests bench
    # The converter tests write weight files of up to ~550 MB; a full disk fails them obscurely.
    tmp="${TMPDIR:-/tmp}"
    free_mb=$(df -Pm "$tmp" 2>/dev/null | awk 'NR==2 {print $4}') || free_mb=""
    if [[ "$free_mb" =~ ^[0-9]+$ ]] && [ "$free_mb" -lt 1500 ]; then
      echo "== warning: only ${free_mb} MB free in $tmp; the tests need about 1 GB (set TMPDIR)" >&2
    fi
    args=()
    for arg in "$@"; do
      if [ "$arg" = --fast ]; then args+=(-m "not slow"); else args+=("$arg"); fi
    done
    .venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
    ;;
  *)
    echo "usage: ./run.sh demo | ./run.sh serve | ./run.sh test [--fast]" >&2
    exit 2
    ;;
esac
