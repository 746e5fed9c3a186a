#!/usr/bin/env bash
# Creates .venv on first use and installs the project into it; later calls return at once
# unless pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DUALFORCE_VENV:-$root/.venv}"
stamp="$venv/.dualforce-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py="${PYTHON:-python3}"
echo "[bootstrap] setting up $venv (first use; ~2 minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q -e "$root" >&2
# DeepSpeed's CPU comm op, built now rather than inside the first training run (training/prebuild_ops.py)
(cd "$root" && "$venv/bin/python" -m training.prebuild_ops) >&2 || echo "[bootstrap] op prebuild failed; the first training run builds it" >&2
echo "$want" > "$stamp"
echo "[bootstrap] ready" >&2
