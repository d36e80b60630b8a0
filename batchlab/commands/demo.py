"""``batchlab demo``: what ``make demo`` runs.

For now a small CPU loss table (batchlab's InfoNCE against open_clip's ClipLoss at
small N); it grows into the training demo on ``codesearch`` as the samplers land.
"""

from __future__ import annotations

from batchlab.commands._common import add_common_arguments, add_subcommand


def add_parser(subparsers) -> None:
    parser = add_subcommand(
        subparsers,
        "demo",
        help="the demo that `make demo` runs",
        description="A small CPU comparison of batchlab's InfoNCE with open_clip's ClipLoss.",
        example="batchlab demo --out results/demo",
    )
    add_common_arguments(parser, out="results/demo")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from batchlab.bench._common import format_table, time_call

    torch.manual_seed(args.seed)
    rows = []
    try:
        from batchlab.losses import info_nce
    except ImportError:
        info_nce = None
    from open_clip.loss import ClipLoss

    clip_loss = ClipLoss()
    scale = torch.tensor(1 / 0.07)
    for n in (256, 1024):
        q = torch.nn.functional.normalize(torch.randn(n, 128), dim=1).requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(n, 128), dim=1).requires_grad_()
        anchor = time_call(lambda: clip_loss(q, k, scale).backward(), device=args.device)
        row = {"N": n, "open_clip ClipLoss fwd+bwd (ms)": anchor * 1e3}
        if info_nce is not None:
            ours = time_call(lambda: info_nce(q, k, scale).backward(), device=args.device)
            row["batchlab info_nce (ms)"] = ours * 1e3
            row["ratio"] = ours / anchor
        rows.append(row)
    print(format_table(rows))
    return 0
