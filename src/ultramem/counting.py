"""Parameter and FLOP counts of a LanguageModel: total, sparse, activated per token, FLOPs per token.

Definitions (all counts are numbers of scalars):
- total: every parameter once (a tied head is the embedding, counted once).
- embedding: the token embedding table, plus the output head when it is untied.
- sparse: memory value tables + MoE expert weights (the parts a token reads only a few rows of).
- activated (per token, embeddings excluded): every non-sparse, non-embedding parameter (attention,
  norms, dense FFNs, MoE routers, and the memory's query, keys, cores, norms and output linear:
  every key is scored for every token, so keys are dense compute) plus, per MoE layer,
  topk * (params of one expert), plus, per memory layer, its `value_param_counts()`: rows read per
  token (heads * topk) at full row width (D_v for UltraMem whatever the chunking, v_dim for PKM).
  A table shared by several layers is counted once in total/sparse.
- activated_with_embedding: activated + embedding (the usual "activated params" headline).
- flops_per_token (forward, multiply-add = 2): 2 * (activated params with ndim >= 2)
  + 2 * vocab * dim (output head) + 4 * n_layers * seq_len * dim (QK^T and AV over the full
  context, not halved for the causal mask; PaLM's convention). Training is ~3x this.
  Approximation: retrieval top-k and the Tucker stage-2 scoring are not counted beyond their
  parameters; the weighted sum over kept value rows is counted as 2 per activated value scalar.
"""

from __future__ import annotations

from .ffn import MoE


def count_params(model, seq_len: int | None = None) -> dict[str, int]:
    cfg = model.cfg
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    params = dict(model.named_parameters())  # deduplicated, so a tied head counts once
    by_id = {id(p): p for p in params.values()}
    embedding_ids = {id(model.tok_emb.weight)}
    if model.lm_head is not None:
        embedding_ids.add(id(model.lm_head.weight))

    sparse_ids, moe_total, moe_active, mem_total, mem_active = set(), 0, 0, 0, 0
    for m in model.modules():
        if isinstance(m, MoE):
            n = sum(p.numel() for p in m.expert_parameters())
            moe_total += n
            moe_active += m.topk * (n // m.num_experts)
            sparse_ids |= {id(p) for p in m.expert_parameters()}
    tables = set()
    for m in model.memory_layers():
        total_values, active_values = m.value_param_counts()
        mem_active += active_values
        if id(m.values) not in tables:  # a table shared by several layers counts once in the total
            tables.add(id(m.values))
            mem_total += total_values
        sparse_ids |= {id(p) for p in m.value_parameters()}

    total = sum(p.numel() for p in by_id.values())
    embedding = sum(by_id[i].numel() for i in embedding_ids)
    dense_ids = by_id.keys() - sparse_ids - embedding_ids
    dense_body = sum(by_id[i].numel() for i in dense_ids)
    dense_matmul = sum(by_id[i].numel() for i in dense_ids if by_id[i].ndim >= 2)
    activated = dense_body + moe_active + mem_active
    flops = (2 * (dense_matmul + moe_active + mem_active) + 2 * cfg.vocab_size * cfg.dim
             + 4 * cfg.n_layers * seq_len * cfg.dim)
    return {
        "total": total,
        "embedding": embedding,
        "sparse": moe_total + mem_total,
        "moe_expert": moe_total,
        "memory_values": mem_total,
        "activated": activated,
        "activated_with_embedding": activated + embedding,
        "flops_per_token": flops,
        "seq_len": seq_len,
    }


def format_counts(counts: dict[str, int]) -> str:
    """One line for logs: 'total 1.23M | activated 0.45M (+emb 0.61M) | sparse ... | 1.2 MFLOP/token'."""
    def m(n):
        return f"{n / 1e6:.3f}M"
    return (f"total {m(counts['total'])} | activated {m(counts['activated'])} "
            f"(+emb {m(counts['activated_with_embedding'])}) | sparse {m(counts['sparse'])} | "
            f"embedding {m(counts['embedding'])} | {counts['flops_per_token'] / 1e6:.2f} MFLOP/token "
            f"@ seq {counts['seq_len']}")

