"""Run by tests/train/test_distributed.py under torchrun --nproc_per_node 2 (gloo): shard tiny
teachers of several architectures with potstill's shard_teacher and compare each forward, and the
logits the chunked loss rebuilds from its gathered head, with the whole model's. Prints JSON."""
import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

from potstill.train.distributed import shard_teacher
from potstill.train.heads import current, output_head

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=97),
    "qwen2-tied-padded": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=128, tie_word_embeddings=True),
    "gemma2-softcap": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=97,
                           final_logit_softcapping=5.0),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=97),
    "phi-bias": dict(model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, vocab_size=97),
    "mixtral-moe": dict(model_type="mixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        vocab_size=97),
}

dist.init_process_group("gloo")
torch.manual_seed(0)
stand_in = torch.nn.Linear(8, 8)  # a sharded "student": its mesh is the teacher's
fully_shard(stand_in)
results = {}
for name, fields in CONFIGS.items():
    fields = dict(fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).eval()
    model.requires_grad_(False)
    ids = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(input_ids=ids, output_hidden_states=True)
    sharded = copy.deepcopy(model)
    held = shard_teacher(sharded, stand_in)
    with torch.no_grad():
        out = sharded(input_ids=ids, output_hidden_states=True)
        rebuilt = current(output_head(sharded, "teacher"), sharded, "teacher").logits(out.hidden_states[-1][0],
                                                                                      dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    results[name] = {"logits": (out.logits - whole.logits).abs().max().item(),
                     "head": (rebuilt - whole.logits[0].float()).abs().max().item(),
                     "held": held, "total": total}
if dist.get_rank() == 0:
    print(json.dumps(results))
dist.destroy_process_group()
