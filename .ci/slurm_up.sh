#!/usr/bin/env bash
# Start the single-node SLURM cluster that tests/test_slurm.py submits to (with slurmdbd so that
# `sacct` works, and one fake GPU so that `--gpus=1` jobs schedule). Called by .ci/run before
# pytest; safe to run by hand and to run twice (start_slurm.sh is idempotent, ~1 s when up).
#
#   bash .ci/slurm_up.sh            # by hand: if the cluster cannot start it says why and
#                                   # exits 0, and the `slurm` tests skip with that reason
#   SLURM_UP_STRICT=1 bash .ci/slurm_up.sh   # exit 1 instead (what .ci/run does)
#
# Strict is also the default when CI is set (CI=true/1/yes): in CI a cluster that does not start
# is a failure, never a silent skip (tests/test_slurm.py fails rather than skips under CI too).
#
# The start script is shared/tools/slurm/start_slurm.sh; shared/ lies beside the clone in CI
# (override with MEDCLUST_SLURM_START=/path/to/start_slurm.sh). It needs root: run directly as
# uid 0 (CI), else through `sudo -n` when that works without a password.
set -uo pipefail

log() { printf '[slurm_up] %s\n' "$*"; }
case "${CI:-}" in true|TRUE|True|1|yes) strict_default=1 ;; *) strict_default=0 ;; esac
strict=${SLURM_UP_STRICT:-$strict_default}
give_up() {
  log "SLURM cluster NOT started: $*"
  if [ "$strict" = 1 ]; then
    log "strict mode (CI or SLURM_UP_STRICT=1): failing"
    exit 1
  fi
  log "tests marked 'slurm' will be skipped"
  exit 0
}

root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel 2>/dev/null) \
  || root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
start=${MEDCLUST_SLURM_START:-$root/../shared/tools/slurm/start_slurm.sh}
[ -f "$start" ] || give_up "no start script at $start (set MEDCLUST_SLURM_START)"

if [ "$(id -u)" = 0 ]; then
  runner=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  runner=(sudo -n --preserve-env=WITH_DBD,FAKE_GPUS,PARTITION,SLURM_ACCOUNT)
else
  give_up "not root and no password-less sudo"
fi

export WITH_DBD=1 FAKE_GPUS=1 PARTITION=debug SLURM_ACCOUNT=testacct
out=$(mktemp /tmp/slurm_up.XXXXXX.log)
log "starting: $start (WITH_DBD=1 FAKE_GPUS=1), log in $out"
t0=$(date +%s)
if ! timeout 600 "${runner[@]}" bash "$start" >"$out" 2>&1; then
  tail -n 25 "$out" | sed 's/^/[slurm_up]   /'
  give_up "start_slurm.sh failed (see $out)"
fi
tail -n 3 "$out" | sed 's/^/[slurm_up]   /'
# The tests need accounting (sacct) and the account the profile test passes.
sacct -n -X -S now >/dev/null 2>&1 || give_up "sacct does not answer (slurmdbd down?)"
log "cluster up in $(( $(date +%s) - t0 )) s: $(sinfo -h -o '%P %a %D %T %G' | tr '\n' ' ')"
