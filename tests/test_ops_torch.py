"""More of the torch ops (see test_ops.py): every blocked top-k plan, and force_reference end to end."""

import torch

from ultramem import ops
from ultramem.ops.topk import blocked_topk


def test_every_blocked_plan_is_exact():
    x = torch.randn(3, 2048)
    want = x.topk(16, dim=-1).indices.sort(-1).values
    for widths in ((2,), (4, 2), (8, 4), (16,), (32, 2)):
        assert torch.equal(blocked_topk(x, 16, False, widths).sort(-1).values, want), widths


def test_force_reference_gives_the_same_layer_output():
    from ultramem import UltraMemConfig, UltraMemLayer

    torch.manual_seed(0)
    layer = UltraMemLayer(UltraMemConfig(dim=32, num_keys=8, key_dim=8, value_dim=8, topk=4))
    x = torch.randn(2, 3, 32)
    fast = layer(x)
    with ops.force_reference():
        ref = layer(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
