"""The communication model of SPEC section 8, for the tables in `tables.py`, and the layout choice.

Bytes one rank sends per training step (forward + backward) for one memory layer, with T tokens
on each of the P ranks of the mp group, K kept entries per token (m * H), G bags per token (IVE
blocks), C chunks, D_v value width; ids travel as int64, weights and values as `val_bytes`:

  dim:  (P-1) * [8 + T K (8 + 2 C v) + 2 T G (D_v / P) v]                    (v = val_bytes)
        all-gather of the counts, the ids and the weights; all-to-all of the pooled slices; the
        backward sends the slices' gradients out and the weights' gradients home.
  row:  16 (P-1) + e (8 + 2 C v) + 2 s D_v v
        e = T K (P-1)/P entries owned elsewhere (routing is assumed uniform), s = the partial sums
        returned, T G (P-1) (1 - (1 - 1/(G P))^K): distinct (bag, other owner) pairs of a token.

The SPEC's own forward-only figures (4-byte ids + 2-byte scores, bf16 values) are `spec_bytes`.
"""

from __future__ import annotations

LAYOUTS = ("dim", "row")


def _check(P: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {LAYOUTS} (got {layout!r})")
    if P < 1:
        raise ValueError(f"P: must be >= 1 (got {P})")


def expected_segments(tokens: float, entries: int, bags: int, P: int) -> float:
    """Expected partial sums a rank gets back per step under uniform routing (other owners only)."""
    cells = bags * P
    return tokens * bags * (P - 1) * (1.0 - (1.0 - 1.0 / cells) ** entries)


def comm_bytes(layout: str, tokens: float, entries: int, bags: int, chunks: int, v_dim: int, P: int,
               val_bytes: int = 4) -> float:
    """Modelled bytes one rank sends per training step (forward + backward) for one layer."""
    _check(P, layout)
    if P == 1:
        return 0.0
    if layout == "dim":
        per_token = entries * (8 + 2 * chunks * val_bytes) + 2 * bags * v_dim / P * val_bytes
        return (P - 1) * (8 + tokens * per_token)
    e = tokens * entries * (P - 1) / P
    s = expected_segments(tokens, entries, bags, P)
    return 16 * (P - 1) + e * (8 + 2 * chunks * val_bytes) + 2 * s * v_dim * val_bytes


def spec_bytes(layout: str, tokens: float, m: int, v_dim: int, P: int) -> float:
    """SPEC section 8's forward traffic (4-byte index + 2-byte score per entry, bf16 values)."""
    _check(P, layout)
    if layout == "dim":
        return tokens * m * (P - 1) * 6 + tokens * v_dim * (P - 1) / P * 2
    return tokens * m * (P - 1) / P * (4 + 2 * v_dim)


def choose_layout(tokens: float, entries: int, bags: int, chunks: int, v_dim: int, P: int,
                  val_bytes: int = 4) -> tuple[str, dict[str, float]]:
    """The layout with fewer modelled bytes (ties go to "dim"), and both figures."""
    cost = {lay: comm_bytes(lay, tokens, entries, bags, chunks, v_dim, P, val_bytes) for lay in LAYOUTS}
    return min(LAYOUTS, key=lambda lay: (cost[lay], lay != "dim")), cost
