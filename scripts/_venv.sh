# Shared by serve.sh and test.sh: create/refresh .venv for this checkout.
# Usage: . scripts/_venv.sh EXTRAS   (EXTRAS e.g. "" or "train,test")
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.tuner-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  if [ -n "$extras" ]; then
    # torch: CPU build from the local wheel cache; never let a resolver pull CUDA.
    case ",$extras," in *,train,*) .venv/bin/python -m pip install -q "torch==2.13.0" ;; esac
    .venv/bin/python -m pip install -q -e ".[$extras]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi
