# Sourced by the other scripts: create .venv on first use, install the CPU build of torch and the
# package (editable, with dev extras), then activate it. Idempotent and quiet when up to date.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ULTRAMEM_VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.ultramem-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing torch==2.13.0 (CPU) and ultramem[dev,all]" >&2
  # Pin torch first: an unpinned or ranged torch pulls a multi-GB CUDA build here.
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev,all]"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
