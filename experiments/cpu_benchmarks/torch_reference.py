"""Same-machine reference for train_d512_vanilla.json: a Hugging Face LlamaForCausalLM
with the same dimensions (d 512, 8 layers, 8 heads, ffn 1376, vocab 256, tied
embeddings), seq 512, batch 8, AdamW, on torch's CPU backend. Needs torch and
transformers (not dependencies of this package).

  python experiments/cpu_benchmarks/torch_reference.py
"""
import time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True)
m = LlamaForCausalLM(cfg); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
x = torch.randint(0, 256, (8, 512))
def step():
  out = m(input_ids=x, labels=x); out.loss.backward(); opt.step(); opt.zero_grad()
for _ in range(2): step()
ts=[]
for _ in range(4):
  t=time.perf_counter(); step(); ts.append(time.perf_counter()-t)
ts.sort(); med=(ts[1]+ts[2])/2
print(f"HF torch: step {med:.3f} s  {8*512/med:.1f} tok/s  threads {torch.get_num_threads()}")
