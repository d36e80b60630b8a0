"""Paired contrasts of the ablation (nDCG@10 and recall@1, seed by seed) from quality.json."""
import json, sys
from batchlab.recipes.compare import paired_difference
runs = json.load(open(sys.argv[1]))["runs"]
val = {}
for r in runs:
    for m in ("ndcg@10", "recall@1", "mrr@10"):
        val.setdefault((r["arm"], m), {})[r["seed"]] = r["metrics"][m]
arms = ["random-64", "dcl-64", "sogclr-64", "sogclr-nogamma-64", "sogclr-rescaled-64", "mochi-64", "mochi-noquery-64"]
pairs = [(a, "random-64", "vs baseline") for a in arms[1:]] + [
    ("sogclr-nogamma-64", "dcl-64", "(iv) gradient scale x tau alone (gamma 1 both)"),
    ("sogclr-rescaled-64", "sogclr-64", "(iv) gradient scale x 1/tau (gamma 0.9 both)"),
    ("sogclr-64", "sogclr-nogamma-64", "(ii) moving average gamma 0.9 vs 1"),
    ("sogclr-64", "dcl-64", "(ii)+(iv) SogCLR vs DCL"),
    ("mochi-noquery-64", "mochi-64", "MoCHi without vs with query mixes")]
print("| arm | vs | nDCG@10 diff (SE) | wins / ties | largest per-seed abs diff | recall@1 diff (SE) | what it isolates |")
print("|---|---|---|---|---|---|---|")
for a, b, what in pairs:
    d = paired_difference(val[(a, "ndcg@10")], val[(b, "ndcg@10")])
    r = paired_difference(val[(a, "recall@1")], val[(b, "recall@1")])
    se = f"{d.standard_error:.4f}" if d.standard_error is not None else "-"
    rse = f"{r.standard_error:.4f}" if r.standard_error is not None else "-"
    va, vb = val[(a, "ndcg@10")], val[(b, "ndcg@10")]
    ties = sum(va[s] == vb[s] for s in d.seeds)
    big = max(abs(va[s] - vb[s]) for s in d.seeds)
    print(f"| {a} | {b} | {d.difference:+.4f} ({se}) | {d.wins}/{d.n}" + (f", {ties} tied" if ties else "")
          + f" | {big:.1e} | {r.difference:+.4f} ({rse}) | {what} |")
print()
print("| arm | " + " | ".join(f"seed {s}" for s in sorted(val[("random-64", "ndcg@10")])) + " | mean |")
print("|---|" + "---|" * (len(val[("random-64", "ndcg@10")]) + 1))
for a in ["zero-shot"] + arms:
    v = val[(a, "ndcg@10")]
    print(f"| {a} | " + " | ".join(f"{v[s]:.4f}" for s in sorted(v)) + f" | {sum(v.values())/len(v):.4f} |")
