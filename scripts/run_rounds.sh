#!/usr/bin/env bash
# Iterative rounds (RLAIF-V style): run every stage N times, each round's trained policy being the next round's
# strong model. Read it top to bottom; the details are in capdpo/training/rounds.py.
#
#   bash scripts/run_rounds.sh configs/demo.yaml 3 [--flag value ...]
#
# Round k lives in <run_dir>/round<k>/ with its derived config round.yaml. A finished round (06_train.done) is
# skipped, and every stage resumes, so after a crash or Ctrl-C the same command continues where it stopped.
# Extra flags go to every stage of every round (not --run_dir: the rounds own it).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash scripts/run_rounds.sh CONFIG N [--flag value ...]}
rounds=${2:?usage: bash scripts/run_rounds.sh CONFIG N [--flag value ...]}
shift 2
py=${PYTHON:-python}
[ -x .venv/bin/python ] && py=.venv/bin/python

for k in $(seq 1 "$rounds"); do
  # round k's config: the base config + round k-1's policy as strong_adapter (refused if round k-1 is unfinished)
  round_config=$("$py" -m capdpo prepare-round --config "$config" --round "$k")
  if [ -f "$(dirname "$round_config")/06_train.done" ]; then
    echo "=== round $k: already trained ($(dirname "$round_config")), skipped ==="
    continue
  fi
  echo; echo "=== round $k of $rounds: $round_config ==="
  bash scripts/run_all.sh "$round_config" "$@"
done
echo
echo "Done: $rounds round(s). Compare them with eval/answers.py (--adapter <round>/06_train/policy_adapter) and"
echo "eval/report.py --runs base=... round1=... round2=... (see the README's 'Iterative rounds')."
