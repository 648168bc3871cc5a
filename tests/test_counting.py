import pytest
import torch

from ultramem.counting import count_params, format_counts
from ultramem.model import LanguageModel, LMConfig

V, D, L, F, T = 40, 16, 2, 24, 8
BASE = dict(vocab_size=V, dim=D, n_layers=L, n_heads=2, ffn_hidden=F, max_seq_len=T)
BLOCK = 2 * D + 3 * D * D + D * D  # two norms, qkv, out proj
FLOPS_FIXED = 2 * V * D + 4 * L * T * D  # output head + attention over T positions


def build(**over):
    torch.manual_seed(0)
    return LanguageModel(LMConfig(**{**BASE, **over}))


@pytest.mark.parametrize("tied", [True, False])
def test_dense_hand_count(tied):
    c = count_params(build(tie_embeddings=tied))
    body = L * (BLOCK + 3 * D * F) + D  # + final norm
    emb = V * D if tied else 2 * V * D
    assert c["total"] == emb + body and c["embedding"] == emb
    assert c["sparse"] == 0 and c["activated"] == body and c["activated_with_embedding"] == body + emb
    matmul = L * (4 * D * D + 3 * D * F)
    assert c["flops_per_token"] == 2 * matmul + FLOPS_FIXED


def test_moe_hand_count():
    E, K, H = 4, 2, 12
    c = count_params(build(ffn="moe", moe_experts=E, moe_topk=K, moe_hidden=H))
    experts = L * E * 3 * D * H
    body_dense = L * (BLOCK + D * E) + D  # router D*E per block
    assert c["total"] == V * D + body_dense + experts
    assert c["sparse"] == c["moe_expert"] == experts and c["memory_values"] == 0
    assert c["activated"] == body_dense + L * K * 3 * D * H
    matmul = L * (4 * D * D + D * E + K * 3 * D * H)
    assert c["flops_per_token"] == 2 * matmul + FLOPS_FIXED


def test_ultramem_hand_count():
    n, dk, heads, m, r, cores, ex = 8, 8, 2, 4, 2, 2, 4
    dv = D // 2
    mem = dict(num_keys=n, key_dim=dk, heads=heads, topk=m, tucker_rank=r, num_cores=cores,
               value_expansion=ex)
    c = count_params(build(ffn="ultramem", memory_placement="0:1", memory=mem))
    n_side = 2 * n  # sqrt(E) * n keys scored per side
    mem_dense_matmul = D * 2 * dk + 2 * heads * n_side * r * dk + heads * cores * r * r + ex * dv * D
    mem_dense = mem_dense_matmul + 4 * dk  # query and key norm gains
    values = n * n * dv
    body = L * (BLOCK + 3 * D * F) + D
    assert c["total"] == V * D + body + mem_dense + values
    assert c["sparse"] == c["memory_values"] == values
    assert c["activated"] == body + mem_dense + heads * m * dv
    matmul = L * (4 * D * D + 3 * D * F) + mem_dense_matmul + heads * m * dv
    assert c["flops_per_token"] == 2 * matmul + FLOPS_FIXED


def test_pkm_hand_count_two_layers():
    n, dk, heads, k = 6, 8, 2, 3
    mem = dict(num_keys=n, key_dim=dk, heads=heads, topk=k, query_norm="batch")
    c = count_params(build(ffn="pkm", memory_placement="0:0/1:1", memory=mem), seq_len=5)
    per_layer_dense = D * heads * dk + 2 * heads * dk + heads * n * dk  # W_q, BatchNorm, sub-keys
    values = n * n * D  # full-width values (value_dim defaults to dim), no output linear
    body = L * (BLOCK + 3 * D * F) + D
    assert c["total"] == V * D + body + 2 * (per_layer_dense + values)
    assert c["sparse"] == 2 * values
    assert c["activated"] == body + 2 * (per_layer_dense + heads * k * D)
    assert c["seq_len"] == 5
    matmul = L * (4 * D * D + 3 * D * F) + 2 * (D * heads * dk + heads * n * dk + heads * k * D)
    assert c["flops_per_token"] == 2 * matmul + 2 * V * D + 4 * L * 5 * D


def test_format_counts_mentions_every_headline():
    line = format_counts(count_params(build()))
    for word in ("total", "activated", "sparse", "embedding", "MFLOP/token"):
        assert word in line
