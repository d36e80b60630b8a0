#!/bin/bash
# Session 9 call 2: helpers' first scripts (glue, sig). Tree: local HEAD + the helpers' uncommitted edits (tree.txt).
T0=$(date +%s)
for h in ${HELPERS:-glue sig}; do
  mkdir -p $OUT/$h; cmd=$(cat .gpu/s9/$h.ready)
  echo "######## $h: $cmd"; OUT=$OUT/$h timeout ${LIM:-200} $cmd > $OUT/$h/stdout.txt 2>&1; echo "rc=$?" >> $OUT/$h/stdout.txt
  tail -40 $OUT/$h/stdout.txt; echo "$h done at $(( $(date +%s) - T0 )) s"
done
