"""Expert offloading with next-layer prediction on a small random Mixtral (runs on CPU in seconds; on a GPU the
experts live in page-locked host memory and copies run on a side stream).

    python examples/moe_offload.py [--mode speculative] [--budget-frac 0.25]
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from hf_efficient.moe import MODES, add_pregates, enable_pregated_offload, find_moe_layers

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=MODES, default="speculative")
ap.add_argument("--budget-frac", type=float, default=0.25, help="device budget / all expert bytes")
a = ap.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
with torch.device(device):
    model = AutoModelForCausalLM.from_config(cfg).eval()
model.set_experts_implementation("eager")  # the reference our offloaded experts reproduce bit for bit
prompt = torch.randint(0, 1000, (1, 32), device=device)
reference = model.generate(prompt, max_new_tokens=16, do_sample=False)

layers = find_moe_layers(model)
all_experts_gb = layers[0].expert_bytes * layers[0].num_experts * len(layers) / 2**30
if a.mode == "pregated":
    add_pregates(model)  # untrained: copies of the next routers (train with distill_pregates / train_pregates)
off = enable_pregated_offload(model, gpu_budget_gb=a.budget_frac * all_experts_gb, mode=a.mode)
out = model.generate(prompt, max_new_tokens=16, do_sample=False)

s = off.stats
print(f"mode={a.mode}  cache slots per layer={off.slots_per_layer}/{layers[0].num_experts}  "
      f"device cache={off.gpu_bytes() / 2**20:.1f} MiB of {all_experts_gb * 1024:.1f} MiB of experts")
print(f"copied {s.bytes_copied / 2**20:.1f} MiB ({s.demand_bytes / 2**20:.1f} on demand, "
      f"{s.prefetch_bytes / 2**20:.1f} prefetched, {s.wasted_bytes / 2**20:.1f} wasted); hit rate {s.hit_rate:.2f}; "
      f"recall {s.recall if s.recall is None else round(s.recall, 3)}")
print("same tokens as without offload:", torch.equal(out, reference))
off.disable()
