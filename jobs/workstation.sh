#!/bin/bash
# Train mpisplit on one machine: one rank per core, each bound to its core, one BLAS thread.
#
#   jobs/workstation.sh                                  # tp = number of cores
#   NP=4 TP=2 STEPS=2000 jobs/workstation.sh --data input.txt --layers 6
#
# Arguments go to train.py. Run it again after an interruption and it continues from the newest
# checkpoint in OUT (--resume). Ctrl-C (or SIGTERM) once: the ranks save at the next step and
# exit 0; Ctrl-C twice: abort at once.
#
# Settings (environment): NP (ranks; default the number of usable cores), TP and DP (default
# TP = NP, DP = 1), OUT (run folder, default runs/workstation), STEPS, SAVE_MINUTES,
# COLLECTIVE_TIMEOUT (seconds), MPIRUN (the launcher), PYTHON, MPISPLIT_DIR (checkout with
# train.py; default this script's parent folder).

set -uo pipefail

MPISPLIT_DIR=${MPISPLIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-mpirun}
NP=${NP:-$(nproc)}
TP=${TP:-$NP}
DP=${DP:-$(( NP / TP ))}
OUT=${OUT:-runs/workstation}
STEPS=${STEPS:-600}
SAVE_MINUTES=${SAVE_MINUTES:-10}
COLLECTIVE_TIMEOUT=${COLLECTIVE_TIMEOUT:-600}
export OMP_NUM_THREADS=1 MPISPLIT_BLAS_THREADS=1

RESUME=()
if [[ -f $OUT/latest ]] || compgen -G "$OUT/step-*/index.json" > /dev/null; then
    RESUME=(--resume)
fi

case $("$MPIRUN" --version 2>&1) in
    *HYDRA*) BIND=(-bind-to core) ;;
    *"Open MPI"* | *OpenRTE*) BIND=(--bind-to core --map-by core) ;;
    *) BIND=() ;;
esac

echo "$NP rank(s) on $(hostname), tp $TP x dp $DP, out $OUT ${RESUME[*]}"
exec "$MPIRUN" -n "$NP" "${BIND[@]}" "$PYTHON" "$MPISPLIT_DIR/train.py" --tp "$TP" --dp "$DP" \
    --steps "$STEPS" --out "$OUT" --save-every-minutes "$SAVE_MINUTES" \
    --collective-timeout "$COLLECTIVE_TIMEOUT" "${RESUME[@]}" "$@"
