#!/usr/bin/env bash
# usage: scripts/deploy_checks/setup-venv.sh NAME SPEC...
# Installs the PyPI packages SPEC... into .venv-deploy/NAME at the repository root.
# Idempotent: does nothing when a venv with exactly these specs is there (marker file).
# The tools live in separate venvs because their pins collide: aws-sam-cli and checkov pin
# different boto3 versions, and checkov's bc-python-hcl2 installs the same `hcl2` module as
# python-hcl2.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1
shift
venv=.venv-deploy/$name
marker=$venv/.installed
spec="$*"
if [ -x "$venv/bin/python" ] && [ "$(cat "$marker" 2>/dev/null)" = "$spec" ]; then
  exit 0
fi
echo "installing $spec into $venv ..." >&2
mkdir -p .venv-deploy
# Keep the venvs out of git whatever the repository's .gitignore says.
echo '*' > .venv-deploy/.gitignore
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
echo "$spec" > "$marker"
