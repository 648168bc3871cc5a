"""Every impossible memory config is refused at construction, naming the field and the rule."""

import pytest

from ultramem import PKMConfig, UltraMemConfig, UltraMemLayer

BASE = dict(dim=64, num_keys=8, key_dim=16, value_dim=32, heads=2, topk=8)


@pytest.mark.parametrize("changes,field,rule", [
    ({"value_expansion": 2}, "value_expansion", "perfect square"),
    ({"value_expansion": 0}, "value_expansion", "positive int"),
    ({"topk": 16 * 16 + 1, "stage1_topk": 16}, "topk", "stage1_topk"),
    ({"topk": 10, "stage1_topk": 3}, "topk", "stage1_topk\\^2"),
    ({"value_dim": 30, "num_cores": 4}, "value_dim", "divisible by num_cores"),
    ({"stage1_topk": 17}, "stage1_topk", "n'=sqrt\\(E\\)\\*n=16"),
    ({"stage1_topk": 0}, "stage1_topk", "positive int"),
    ({"heads": 0}, "heads", "positive int"),
    ({"dim": 64.0}, "dim", "positive int"),
    ({"tucker_rank": True}, "tucker_rank", "positive int"),
    ({"norm": "batch"}, "norm", "one of"),
    ({"init": "xavier"}, "init", "one of"),
    ({"lookup": "triton"}, "lookup", "one of"),
    ({"core_loss_coef": -1.0}, "core_loss_coef", ">= 0"),
    ({"core_loss_coef": 1e-3, "tucker_rank": 1}, "core_loss_coef", "tucker_rank >= 2"),
    ({"value_init_std": 0.0}, "value_init_std", "number > 0"),
    ({"value_init_std": float("nan")}, "value_init_std", "number > 0"),
    ({"value_init_std": "0.02"}, "value_init_std", "number > 0"),
])
def test_ultramem_config_errors(changes, field, rule):
    with pytest.raises(ValueError, match=rf"^{field}: .*{rule}.*\(got "):
        UltraMemConfig(**{**BASE, **changes})


def test_topk_larger_than_virtual_grid():
    with pytest.raises(ValueError, match="topk"):
        UltraMemConfig(dim=8, num_keys=2, key_dim=4, value_dim=4, topk=17, value_expansion=1, stage1_topk=2)


def test_defaults_follow_the_spec():
    cfg = UltraMemConfig(dim=512)
    assert cfg.v_dim == 256 and cfg.out_dim == 512
    assert cfg.keys_per_side == 2 * cfg.num_keys  # sqrt(E) * n with E = 4
    assert cfg.m1 == cfg.topk and UltraMemConfig(dim=8, num_keys=200, topk=200).m1 == 128
    assert cfg.num_virtual == 4 * cfg.num_keys ** 2
    assert (cfg.tucker_rank, cfg.num_cores, cfg.heads) == (2, 2, 2)


def test_round_trip_and_unknown_fields():
    cfg = UltraMemConfig(**BASE)
    assert UltraMemConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        UltraMemConfig.from_dict({**BASE, "num_heads": 3})
    with pytest.raises(TypeError, match="UltraMemConfig"):
        UltraMemLayer(PKMConfig(dim=8))


def test_pkm_config_shares_field_names():
    shared = {"dim", "num_keys", "key_dim", "heads", "topk", "value_dim", "dim_out", "lookup",
              "sparse_values", "value_init_std"}
    assert shared <= set(PKMConfig.__dataclass_fields__) & set(UltraMemConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="^num_keys: must be a positive int"):
        PKMConfig(dim=8, num_keys=0)
    with pytest.raises(ValueError, match="^value_init_std: must be a number > 0"):
        PKMConfig(dim=8, value_init_std=-0.1)
