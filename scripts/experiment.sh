#!/usr/bin/env bash
# The experiment "does TTT beat search?" (README, Benchmarks): `discover bench` commands in priority order
# (the calibration agents, then AC1 seed by seed, then AC2, then the temperature controls, then the
# (1+1)-ES), pulled by two workers (the thread governor gives each a core). Resumable: run it again and `discover bench` skips finished runs
# and resumes unfinished ones from their folders. Then: discover leaderboard "$OUT" --write leaderboards/
#
#   OUT=runs/experiment NICE=5 scripts/experiment.sh          # from a git worktree at one fixed commit
#   DISCOVER="python -c 'from discover_agent.cli import main; raise SystemExit(main())'" ...  # a venv without the script
set -u
OUT=${OUT:-runs/experiment}
NICE=${NICE:-5}
DISCOVER=${DISCOVER:-discover}
LOGS=${LOGS:-$OUT.logs}
COMMON="--rollouts 800 --groups 2 --group-size 8 --out $OUT"
rm -rf "$LOGS/claims"
mkdir -p "$OUT"
# Finished runs committed by scripts/keep_finished_runs.sh are skipped (their result.json is in place).
[ -d leaderboards/runs ] && cp -rn leaderboards/runs/. "$OUT"/
mkdir -p "$LOGS/claims"
items=()
for s in 0 1 2 3 4 5 6 7; do  # the calibration agents first: minutes for all seeds of both envs
  items+=("discover/AC1-v0|random-search,es|$s")
done
for s in 0 1 2 3; do
  items+=("discover/AC2-v0|random-search,es|$s")
done
for s in 0 1 2 3 4 5 6 7; do
  items+=("discover/AC1-v0|ttt|$s" "discover/AC1-v0|puct|$s" "discover/AC1-v0|best-of-n|$s")
done
for s in 0 1 2 3; do
  items+=("discover/AC2-v0|ttt|$s" "discover/AC2-v0|puct|$s" "discover/AC2-v0|best-of-n|$s")
done
for s in 0 1 2 3; do  # controls: is TTT's gain only a sharper sampling distribution?
  items+=("discover/AC1-v0|puct[temperature=0.7]|$s" "discover/AC1-v0|best-of-n[temperature=0.7]|$s")
done
for s in 0 1 2 3 4 5 6 7; do  # the sequential (1+1)-ES, 800 one-reply steps: the issue's calibration figure
  items+=("discover/AC1-v0|es[groups=1,group_size=1]|$s")
done
worker() {
  for i in "${!items[@]}"; do
    mkdir "$LOGS/claims/$i" 2>/dev/null || continue  # another worker took it
    IFS='|' read -r env agents seed <<< "${items[$i]}"
    echo "$(date -u +%FT%TZ) worker $1 item $i: $env $agents seed $seed" >> "$LOGS/queue.log"
    eval nice -n "$NICE" "$DISCOVER" bench --envs "$env" --agents "'$agents'" --seeds "$seed" $COMMON \
      > "$LOGS/item-$i.log" 2>&1
    echo "$(date -u +%FT%TZ) worker $1 item $i: exit $?" >> "$LOGS/queue.log"
  done
}
worker 1 & worker 2 & wait
echo "$(date -u +%FT%TZ) queue done" >> "$LOGS/queue.log"
