"""The README's tables, claim rows and time estimate, from the merged quality.json (no training).

    python benchmarks/results/quality-h200-5seeds/tables.py [quality.json] > tables.md

Per dataset: every arm with its seeds, the four metrics, the paired differences from random-64 on all
four (SE, seeds ahead), steps, pairs seen and wall time; the claim checks of the merged file; the
repeated runs' line; and the estimate of the whole study as one command (see ``estimate``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")


def _diff(d: dict | None) -> str:
    if d is None:
        return "-"
    if d["standard_error"] is None:
        return f"{d['difference']:+.4f} (1 seed)"
    return f"{d['difference']:+.4f} ({d['standard_error']:.4f})"


def table(summary: dict, baseline: str) -> str:
    head = ["arm", "seeds", "nDCG@10", "MRR@10", "R@1", "R@10", f"ΔnDCG@10 vs {baseline} (SE), wins", "ΔMRR@10 (SE)",
            "ΔR@1 (SE)", "ΔR@10 (SE)", "steps", "pairs seen", "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, s in summary.items():
        ds = [s.get(f"{m}_vs_{baseline}") for m in METRICS]
        first = _diff(ds[0]) + (f", {ds[0]['wins']}/{len(ds[0]['seeds'])}" if ds[0] else "")
        lo, hi = s["steps_range"]
        steps = str(s["steps"]) if lo == hi else f"{s['steps']} ({lo}-{hi})"
        cells = [arm, str(s["seeds"]), *(f"{s[m]:.4f}" for m in METRICS), first, *(_diff(d) for d in ds[1:]), steps,
                 f"{s['examples']:,}", f"{s['wall_seconds']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def claims(checks: list) -> str:
    rows = []
    for c in checks:
        if "share_of_steps" in c:
            rows.append(f"* {c['claim']}: {c['reason']} (verdict: {c['verdict']}; target met: {c['target_half_steps']})")
            continue
        per_seed = ", ".join(f"{float(v):+.4f}" for _, v in sorted(c["per_seed"].items(), key=lambda kv: int(kv[0])))
        rows.append(f"* {c['claim']}: {c['difference']:+.4f} (SE {c['standard_error']:.4f}, {c['wins']}/{len(c['seeds'])}; "
                    f"per seed {per_seed}): {c['verdict'] or c['reason']}"
                    + (" [arm chosen on the test split]" if c.get("selected_on_test") else ""))
    return "\n".join(rows)


def estimate(payload: dict, files: list[dict]) -> str:
    """The whole study as one command: for every (dataset, arm), the mean over its seeds of the run's
    timed wall + evaluation seconds, times 5 seeds; plus each call's untimed part per run (model reset,
    writing the JSON and plots after each seed: the call's study seconds minus warm-up minus its runs'
    wall + eval, divided by its runs), the largest warm-up of the calls (every kind of step once) and
    data loading (in the warm-up's call)."""
    runs = payload["runs"]
    per = {}
    for r in runs:
        per.setdefault((r["dataset"], r["arm"]), []).append(r["seconds"]["wall"] + r["seconds"].get("eval", 0.0))
    timed = sum(5 * statistics.fmean(v) for v in per.values())
    overheads, lines = [], []
    for name, f in files:
        own = sum(r["seconds"]["wall"] + r["seconds"].get("eval", 0.0) for r in f["runs"])
        rest = f["study_seconds"] - f.get("warmup_seconds", 0.0) - own
        overheads.append(rest / len(f["runs"]))
        lines.append(f"{name}: {len(f['runs'])} runs, study {f['study_seconds']:.0f} s = warm-up {f.get('warmup_seconds', 0):.0f} + "
                     f"runs {own:.0f} + rest {rest:.0f} ({rest / len(f['runs']):.2f} s per run)")
    n_runs = 5 * len(per)
    rest = max(overheads) * n_runs
    warm = max(f.get("warmup_seconds", 0.0) for _, f in files)
    total = timed + rest + warm
    arms = sorted({a for _, a in per})
    return ("\n".join(f"  {line}" for line in lines) +
            f"\n  {len(arms)} arms x {len({d for d, _ in per})} datasets x 5 seeds = {n_runs} runs: timed (wall + eval) "
            f"{timed:.0f} s + rest {rest:.0f} s (largest per-run rest {max(overheads):.2f} s) + warm-up {warm:.0f} s "
            f"= {total:.0f} s = {total / 60:.1f} min")


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("quality.json"))
    payload = json.loads(path.read_text())
    baseline = payload["settings"]["baseline"]
    for name, summary in payload["summary"].items():
        print(f"### {name}\n\n{table(summary, baseline)}\n\n{claims(payload['claims'][name])}\n")
    rep = payload.get("repeats")
    if rep:
        by = {}
        for x in rep["runs"]:
            by.setdefault(x["dataset"], []).append(x)
        for name, xs in by.items():
            print(f"repeats {name}: {len(xs)} runs; max |diff| " + ", ".join(
                f"{m} {max(abs(x['difference'][m]) for x in xs):.4f}" for m in METRICS)
                + f"; wall {max(abs(x['wall_seconds_difference']) for x in xs):.2f} s")
        print("repeats, all:", ", ".join(f"{m} {v:.4f}" for m, v in rep["max_abs_difference"].items()))
    folder = path.parent
    files = [(p.parent.name, json.loads(p.read_text())) for p in sorted(folder.glob("call*/quality.json"))]
    if files:
        print("\nwhole study as one command:\n" + estimate(payload, files))


if __name__ == "__main__":
    main()
