"""Every ```python block in docs/*.md and README.md runs, in order, one subprocess per page.

Blocks of one page share a namespace (later blocks may use earlier ones). A block
fenced as ```python no-run is shown but not executed (for GPU-only or long examples).
The subprocess runs with HF_HUB_OFFLINE=1, one torch thread and the Agg matplotlib
backend, in a temporary directory so examples that write files leave the repo clean.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

RUNNER = r"""
import json, sys, time, traceback
import torch
torch.set_num_threads(1)
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for block in blocks:
    start = time.perf_counter()
    try:
        exec(compile(block["code"], f"{block['page']}:{block['line']}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"\nFAILED: the python block at {block['page']} line {block['line']}", file=sys.stderr)
        sys.exit(1)
    print(f"[block at line {block['line']}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
"""


def python_blocks(page: Path) -> list[dict]:
    """The runnable python blocks of a page: code, page name and starting line."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip().split()
        if not info or info[0] != "python" or "no-run" in info[1:]:
            continue
        line = text.count("\n", 0, match.start(2)) + 1
        blocks.append({"code": match.group(2), "page": page.name, "line": line})
    return blocks


def test_fence_parser_finds_blocks_and_skips_no_run(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```python\nx = 1\n```\n```python no-run\nraise SystemExit\n```\n```bash\nls\n```\n")
    assert python_blocks(page) == [{"code": "x = 1\n", "page": "p.md", "line": 3}]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p.exists() and python_blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path):
    blocks = python_blocks(page)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "runner.py", "blocks.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page.name}: an example failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
