#!/usr/bin/env bash
# Copy the finished runs of a bench folder (those with result.json) into the repository, small files only
# (result.json: the leaderboard entry; config.json; best.json: the best state and its lineage; metrics.csv),
# so they can be committed and `discover leaderboard leaderboards/runs --write leaderboards/` rebuilds the
# tables anywhere. scripts/experiment.sh seeds its output folder from them: a later session skips them.
#
#   scripts/keep_finished_runs.sh runs/experiment leaderboards/runs
set -euo pipefail
src=${1:?bench folder}
dest=${2:-leaderboards/runs}
find "$src" -name result.json -type f | sort | while read -r result; do
  run=$(dirname "$result")
  rel=${run#"$src"/}
  mkdir -p "$dest/$rel"
  for f in result.json config.json best.json metrics.csv; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dest/$rel/$f"
  done
  echo "$rel"
done
