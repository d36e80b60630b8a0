"""Session 7 final: torch.compile(fullgraph=True) + CUDA-graph replay of a training step on the streaming path (N = 20,000) after this session's kernel changes."""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
from tests.losses.gpu_check_overhead import compile_and_graph_check
out = Path(os.environ["OUT"]) / "graph"; out.mkdir(parents=True, exist_ok=True)
rows = []
for family in ("info_nce", "siglip", "dcl"):
    t = time.time()
    try:
        compile_and_graph_check(family, 20000, 64, 512, rows)
    except Exception as exc:  # noqa: BLE001
        rows.append({"check": "setup", "family": family, "ok": False, "error": repr(exc)[:600]})
    for r in rows[-2:]:
        print(json.dumps(r), f"[{time.time() - t:.0f} s]", flush=True)
    (out / "graph.json").write_text(json.dumps(rows, indent=1))
print("all ok" if all(r.get("ok") for r in rows) else "FAILED", len(rows))
