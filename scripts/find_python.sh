#!/usr/bin/env bash
# Print the path of a Python X.Y interpreter: $PYTHON<XY> if set (e.g. PYTHON312), else `pythonX.Y`
# on PATH, else the newest pyenv X.Y.* (~/.pyenv/versions). Exit 1 with a loud message if none.
# Usage: bash scripts/find_python.sh 3.12
set -euo pipefail
want="${1:?usage: find_python.sh X.Y}"
var="PYTHON${want//./}"
candidates=()
[ -n "${!var:-}" ] && candidates+=("${!var}")
command -v "python$want" >/dev/null 2>&1 && candidates+=("$(command -v "python$want")")
root="${PYENV_ROOT:-$HOME/.pyenv}"
while IFS= read -r dir; do
  candidates+=("$dir/bin/python$want")
done < <(ls -d "$root/versions/$want".* 2>/dev/null | sort -V -r)
for py in "${candidates[@]}"; do
  # a pyenv shim answers for a version it does not have: ask the interpreter itself
  if [ -x "$py" ] && [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
    echo "$py"
    exit 0
  fi
done
echo "error: no Python $want found (tried \$$var, python$want on PATH, $root/versions/$want.*);" \
     "install one (e.g. pyenv install $want) or set $var=/path/to/python$want" >&2
exit 1
