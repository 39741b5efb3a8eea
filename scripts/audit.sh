#!/usr/bin/env bash
# Dependency audit: known vulnerabilities (PyPI advisory DB / OSV) in the installed environment.
# Needs network access to the vulnerability database, so it is a documented script, not part of CI.
#
#   scripts/audit.sh                 # audit the active environment (the venv you serve or train from)
#   scripts/audit.sh --serve-only    # audit only what `pip install -e '.[serve]'` pulls in (a fresh temp venv)
#   AUDIT_ARGS="--vulnerability-service osv" scripts/audit.sh
#
# --strict: a dependency that could not be looked up (no network, a private mirror) fails the audit
# instead of passing it silently. Exit status: pip-audit's (0 = all looked up, none vulnerable).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -m pip_audit --version >/dev/null 2>&1; then
  echo "pip-audit is not installed: pip install pip-audit" >&2
  exit 2
fi
if [[ "${1:-}" == "--serve-only" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q -e '.[serve]'
  "$tmp/venv/bin/pip" freeze --exclude-editable > "$tmp/requirements.txt"
  # shellcheck disable=SC2086
  exec python -m pip_audit --strict --progress-spinner off --desc on -r "$tmp/requirements.txt" ${AUDIT_ARGS:-}
fi
# the project itself is a local editable install, not on PyPI: skip it instead of reporting it unknown
# shellcheck disable=SC2086
exec python -m pip_audit --strict --progress-spinner off --desc on --skip-editable ${AUDIT_ARGS:-}
