#!/usr/bin/env bash
# Fail when proto/ would break existing callers of modelbroker.v1 (buf breaking, FILE rules
# from buf.yaml), compared with the proto/ of earlier commits.
#
# What it compares against (all from the local .git, no network):
#   - HEAD, when proto/ has uncommitted changes (a developer checking before committing);
#   - every distinct proto/ of the last $BUF_BREAKING_DEPTH (20) commits that changed it,
#     up to HEAD~1. CI runs on a clean clone of the submitted main, where HEAD already holds
#     the change, so HEAD~1 is "main before this change"; looking further back also catches
#     a break in the middle of a submission of several commits that a later commit hides.
#   BUF_BREAKING_AGAINST=<ref> compares against that one ref instead (e.g. a release tag).
# On the first commit (or a shallow clone without history) there is nothing to compare:
# it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF=${BUF:-.venv/bin/buf}
if [[ ! -x $BUF ]]; then
  BUF=clients/node/node_modules/.bin/buf
fi
if [[ ! -x $BUF ]]; then
  echo "buf-breaking: no buf (.venv/bin/buf from 'make install', or clients/node's npm ci)" >&2
  exit 1
fi
if ! git rev-parse --verify --quiet HEAD >/dev/null; then
  echo "buf-breaking: skipped: not a git checkout with commits, nothing to compare with"
  exit 0
fi

against=()
if [[ -n ${BUF_BREAKING_AGAINST:-} ]]; then
  against+=("$(git rev-parse --verify "$BUF_BREAKING_AGAINST^{commit}")")
else
  if [[ -n $(git status --porcelain -- proto) ]]; then
    against+=("$(git rev-parse HEAD)")
  fi
  if git rev-parse --verify --quiet 'HEAD~1^{commit}' >/dev/null; then
    declare -A seen=()
    # Commits up to HEAD~1 that changed proto/; each one's tree is a proto/ callers may use.
    while read -r commit; do
      tree=$(git rev-parse "$commit:proto" 2>/dev/null || true)
      if [[ -n $tree && -z ${seen[$tree]:-} ]]; then
        seen[$tree]=1
        against+=("$commit")
      fi
    done < <(git rev-list --max-count="${BUF_BREAKING_DEPTH:-20}" HEAD~1 -- proto)
  elif [[ $(git rev-parse --is-shallow-repository) == true ]]; then
    echo "buf-breaking: skipped: shallow clone without HEAD~1 (git fetch --unshallow to check)"
  else
    echo "buf-breaking: skipped: HEAD is the first commit, no earlier proto/ to compare with"
  fi
fi

status=0
for ref in "${against[@]}"; do
  short=$(git rev-parse --short "$ref")
  if "$BUF" breaking proto --against ".git#ref=$ref,subdir=proto"; then
    echo "buf-breaking: proto/ is compatible with $short"
  else
    echo "buf-breaking: proto/ breaks callers of $short ($(git log -1 --format=%s "$ref"))" >&2
    status=1
  fi
done
if [[ $status -ne 0 ]]; then
  echo "modelbroker.v1 takes additive changes only; a breaking change goes into modelbroker.v2 beside it (README: Compatibility)" >&2
fi
exit $status
