#!/usr/bin/env bash
# A training run killed with SIGKILL midway and resumed with --resume must end bitwise equal to
# the same run left alone: same weights, same AdamW moments, same loss at every step.
# usage: tests/resume_kill.sh [path/to/bt]
set -euo pipefail
BT=${1:-./bt}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
run="train --steps 80 --batch 8 --d-model 32 --layers 2 --save-every 10 --log-every 1 --seed 5"

$BT $run --out "$dir/whole.safetensors" > "$dir/whole.log"

$BT $run --out "$dir/killed.safetensors" > "$dir/killed.log" &
pid=$!
until grep -q "^step    35/" "$dir/killed.log" 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { echo "FAIL: the run ended before it could be killed"; exit 1; }
  sleep 0.01
done
kill -9 $pid
wait $pid 2>/dev/null || true
echo "killed at: $(tail -n 1 "$dir/killed.log" | cut -c1-40)"

cp "$dir/killed.safetensors" "$dir/older.safetensors"   # the pair as the kill left it
$BT train --resume "$dir/killed.safetensors" --log-every 1 > "$dir/resumed.log"
grep "resume " "$dir/resumed.log"
cmp "$dir/whole.safetensors" "$dir/killed.safetensors"
cmp "$dir/whole.safetensors.state.safetensors" "$dir/killed.safetensors.state.safetensors"
echo "ok: checkpoint and state (weights, AdamW moments, loss of all 80 steps) bitwise equal to the run never killed"

# a kill between save_run's two renames: the state renamed, the checkpoint older, the new one
# whole in its temporary file; --resume finishes that save
mv "$dir/killed.safetensors" "$dir/killed.safetensors.tmp"
mv "$dir/older.safetensors" "$dir/killed.safetensors"
$BT train --resume "$dir/killed.safetensors" --log-every 1 > "$dir/rolled.log"
cmp "$dir/whole.safetensors" "$dir/killed.safetensors"
test ! -e "$dir/killed.safetensors.tmp"
echo "ok: a save cut between its two renames is finished by --resume"
