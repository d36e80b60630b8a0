#!/bin/bash
# Session 10 call B: install the CuTe DSL + quack (IR library stashed by call A), run the prototype.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
if [ -f /tmp/site/nvidia_cutlass_dsl/cu12/lib/libcute_dsl_runtime.so ]; then echo "already installed"; else
[ -f /root/cute/ir.so.xz ] || { echo "NO STASH: machine was released; rerun call A"; exit 3; }
mkdir -p /tmp/site && tar xJf .cute/b/site312.tar.xz -C /tmp/site || exit 4
L=/tmp/site/nvidia_cutlass_dsl
xz -dc /root/cute/ir.so.xz > $L/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu12.cpython-312-x86_64-linux-gnu.so || exit 5
xz -dc .cute/b/rt.xz > $L/cu12/lib/libcute_dsl_runtime.so || exit 6
chmod +x $L/cu12/lib/libcute_dsl_runtime.so $L/dsl_packages/cutlass/_mlir/_mlir_libs/*.so
fi
echo "installed at $(( $(date +%s) - T0 )) s"
python3 -c "import cuda.bindings, google.protobuf, einops, torch; print('cuda-bindings', cuda.bindings.__version__, 'torch', torch.__version__)"
for s in ${CUTE_SCRIPTS:-.gpu/s10/cute_proto.py}; do
  echo "######## $s"; CUTE_SITE=/tmp/site timeout ${CUTE_TIMEOUT:-300} python3 $s 2>&1 | grep -v Warn | tail -40; echo "rc=$? at $(( $(date +%s) - T0 )) s"
done
