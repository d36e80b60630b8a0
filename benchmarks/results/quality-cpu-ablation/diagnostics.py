"""Two checks at the pretrained all-MiniLM-L6-v2 on the ablation's data (codesearch, 256 training pairs, data seed 0,
32 tokens, one thread), no test pair read:

1. AdamW's eps (1e-8) and SogCLR's gradient scale (tau = 1/20 of DCL's): one random batch of 64 (order seed 1000,
   train mode), gradient of the recipe's DCL loss; AdamW's first update is g / (|g| + eps) (times lr), so
   mean |g| / (|g| + eps) over the parameters' nonzero gradient entries says how much eps shrinks it, for g and g / 20.
2. How InfoNCE and DCL weight the queries: in 4 random batches of 64 (eval mode), InfoNCE's gradient on query i's
   positive logit is -(1 - p_ii); DCL's is -1 for every query.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/results/quality-cpu-ablation/diagnostics.py
"""
import argparse
import json

import torch
import torch.nn.functional as F

from batchlab.bench.quality import load_data
from batchlab.recipes.finetune import load_model, make_batch_loss, sentence_encoder, token_table

torch.set_num_threads(1)
args = argparse.Namespace(max_train=256, max_test=500, packages=["numpy", "scipy", "torch", "networkx", "pandas"],
                          data=None, progress=False)
pairs = load_data("codesearch", args)["train"]
model = load_model("minilm")
model.max_seq_length = 32
cpu = torch.device("cpu")
q_table, k_table = (token_table(model, [p[side] for p in pairs], cpu) for side in (0, 1))
encode = sentence_encoder(model)
perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1000)).view(-1, 64)
out = {}

model.train()
torch.manual_seed(0)
idx = perm[0]
dcl_loss, _ = make_batch_loss("dcl", scale=20.0, num_examples=len(pairs))
dcl_loss(F.normalize(encode(q_table.take(idx)), dim=-1), F.normalize(encode(k_table.take(idx)), dim=-1),
         None, idx, None, None).backward()
grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).abs()
nonzero = grads[grads > 0]
out["adam_eps"] = {"entries": grads.numel(), "nonzero": nonzero.numel()}
for name, factor in (("dcl", 1.0), ("sogclr = dcl / 20", 1 / 20)):
    g = nonzero * factor
    out["adam_eps"][name] = {"median_abs_grad": float(g.median()), "share_below_1e-7": float((g < 1e-7).float().mean()),
                             "mean_first_update_over_lr": float((g / (g + 1e-8)).mean())}

model.eval()
with torch.no_grad():
    everything = torch.arange(len(pairs))
    q = F.normalize(encode(q_table.take(everything)), dim=-1)
    k = F.normalize(encode(k_table.take(everything)), dim=-1)
weight = torch.cat([1 - (20 * q[b] @ k[b].T).softmax(1).diagonal() for b in perm])
out["infonce_query_weight_1_minus_p_pos"] = {
    "queries": weight.numel(), "mean": float(weight.mean()), "median": float(weight.median()),
    "share_below_0.1": float((weight < 0.1).float().mean()), "share_above_0.5": float((weight > 0.5).float().mean())}
print(json.dumps(out, indent=1))
