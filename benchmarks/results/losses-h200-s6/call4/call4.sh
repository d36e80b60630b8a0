#!/bin/bash
# Session 6, call 4: large2 (#21 verify, ~70 s) then sog2 (#19 second run, ~70 s).
T0=$(date +%s)
echo "######## large2"; timeout 95 bash .gpu/s6/large2.sh 2>&1 | tail -60; echo "large2 done at $(( $(date +%s) - T0 )) s"
echo "######## sog2"; timeout 90 bash .gpu/s6/sog2.sh 2>&1 | tail -60; echo "sog2 done at $(( $(date +%s) - T0 )) s"
ls -la $OUT $OUT/*
