#!/bin/bash
# expected wall time ~70 s on a cold 1x H200 (capped at 78 s); carries nothing (repo only); output: $OUT/sog2.tgz
# Issue 19 (helper sog), second run: forward options (one-temperature loop on/off, paired reductions), bench at
# 4,096 / 65,536 vs info_nce auto (median of 10), clustered embeddings at 65,536, bf16 float64-reference check.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
mkdir -p $OUT/sog2
T0=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" > $OUT/sog2/versions.txt
timeout 75 python3 tests/losses/gpu_check_sogclr.py --quick --out $OUT/sog2 > $OUT/sog2/gpu_check.log 2>&1
echo "gpu_check exit $? after $(( $(date +%s) - T0 )) s"
grep -E "^first steps|^sweep|^chosen|^\| (4096|65536) |^clustered|^checks:|^check .*FAIL|^\[|^done|Traceback|Error" \
  $OUT/sog2/gpu_check.log | cut -c1-300 | head -40
tar czf $OUT/sog2.tgz -C $OUT sog2 && rm -rf $OUT/sog2
echo "total: $(( $(date +%s) - T0 )) s"
