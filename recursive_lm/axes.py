"""The axis glossary: one short name per array axis, used in shape comments,
logical sharding names and einsum strings throughout the package.

  letter  logical name  meaning
  ------  ------------  ---------------------------------------------------
  B       batch         sequences in a batch
  T       seq           query positions
  S       kv_seq        key/value positions (cache length when decoding)
  D       embed         model width (residual stream)
  H       heads         query heads
  K       kv_heads      key/value heads (GQA groups)
  Hd      head_dim      width of one head
  F       mlp           hidden width of the feed-forward layer
  E       experts       MoE experts
  R       lora_rank     rank of a LoRA factor
  L       layers        stacked unique blocks, or effective depth for per-depth params
  V       vocab         vocabulary

Depth-plan letters (`recursive_lm.plan`; not array axes of their own, they
split the `layers` axis): U unique blocks of a stage, C loops (repeats) of a
stage; a stage runs U * C effective layers. K and R above stay kv heads and
LoRA rank. "slot" alone means a per-depth slot (`Layer.slot`, `DepthSlot`);
the KV store's entries are "KV slots" (`Layer.kv_slot`).

Model code names logical axes only; `recursive_lm.sharding` maps them to mesh axes.
"""

BATCH = "batch"
SEQ = "seq"
KV_SEQ = "kv_seq"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
EXPERTS = "experts"
LORA_RANK = "lora_rank"
LAYERS = "layers"
VOCAB = "vocab"

ALL = (BATCH, SEQ, KV_SEQ, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERTS, LORA_RANK, LAYERS, VOCAB)
