#!/usr/bin/env bash
# Run one section of a plan of GPU benchmark commands, each under its own time limit, its output kept.
#
#   bash bench/run_plan.sh PLAN SECTION BUDGET_SECONDS
#
# A plan is a text file of sections: a line "[name]" starts one; then one step a line, "LABEL SECONDS COMMAND...";
# '#' starts a comment. A step's stdout and stderr go to $OUT/LABEL.log (and the screen's tail); "$OUT" in a command is
# expanded, so a step can write its tables there. A step that would end past the budget is not started (said so, with
# its label); a step past its own limit is interrupted (SIGINT first: the benchmarks write their JSON after each cell).
# Meant for the device machine, whose commands are limited in time: a session's plan runs section by section.
set -uo pipefail
plan=${1:?plan file}; section=${2:?section name}; budget=${3:?budget in seconds}
OUT=${OUT:-$(mktemp -d)}; export OUT
grep -q "^\[$section\]" "$plan" || { echo "no section [$section] in $plan; sections: $(grep -o '^\[[^]]*\]' "$plan" | tr '\n' ' ')" >&2; exit 2; }
start=$SECONDS; ran=0
while IFS= read -r line; do
    read -r label limit command <<<"$line"
    [[ "$label" =~ ^[A-Za-z0-9_.-]+$ && "$limit" =~ ^[0-9]+$ ]] || { echo "bad step line in [$section]: $line" >&2; exit 2; }
    if (( SECONDS - start + limit > budget )); then
        echo "== $label: not started ($((SECONDS - start)) s used of $budget, the step may take $limit)"; continue
    fi
    echo "== $label (limit $limit s): $command"
    t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" bash -c "$command" >"$OUT/$label.log" 2>&1
    rc=$?
    tail -n 15 "$OUT/$label.log"
    echo "== $label: rc $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ' (its time limit)')"
    ran=$((ran + 1))
done < <(awk -v s="[$section]" '/^\[/ {on = ($0 == s); next} on && NF && $1 !~ /^#/' "$plan")
echo "== [$section]: $ran steps run in $((SECONDS - start)) s; logs in $OUT"
