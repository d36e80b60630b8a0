#!/bin/bash
# Session 6, call 3: helpers' scripts in sequence: large (#21, ~190 s), st (#17, ~85 s), sog (#19, ~130 s).
T0=$(date +%s)
echo "######## large"; timeout 230 bash .gpu/s6/large.sh 2>&1 | tail -90; echo "large done at $(( $(date +%s) - T0 )) s"
echo "######## st"; timeout 110 bash .gpu/s6/st.sh 2>&1 | tail -40; echo "st done at $(( $(date +%s) - T0 )) s"
echo "######## sog"; timeout 150 bash .gpu/s6/sog.sh 2>&1 | tail -80; echo "sog done at $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf sog.tgz --remove-files sog; ls -la $OUT $OUT/large
