"""The memory's training recipes (issue 19): `train.recipe` fills defaults, explicit fields win, and
the authors' recipe decays every memory tensor."""

import pytest

from ultramem.model import LanguageModel
from ultramem.optim import build_optimizer, split_param_groups
from ultramem.train import RunConfig

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn": "ultramem", "memory_placement": "0:1",
         "memory": {"num_keys": 4, "key_dim": 8, "topk": 4}}


def test_the_paper_recipe_is_todays_defaults_and_authors_sets_its_four_fields():
    paper = RunConfig.from_dict({"model": MODEL})
    assert (paper.train.recipe, paper.train.value_weight_decay, paper.train.memory_decay_all,
            paper.train.value_lr_decay_frac, paper.model.memory.init) == ("paper", 0.0, False, 0.25, "paper")
    authors = RunConfig.from_dict({"model": MODEL, "train": {"recipe": "authors"}})
    assert (authors.train.value_weight_decay, authors.train.memory_decay_all,
            authors.train.value_lr_decay_frac, authors.model.memory.init) == (0.1, True, 1.0, "authors")
    mixed = RunConfig.from_dict({"model": {**MODEL, "memory": {**MODEL["memory"], "init": "paper"}},
                                 "train": {"recipe": "authors", "value_weight_decay": 0.0}})
    assert mixed.train.value_weight_decay == 0.0 and mixed.model.memory.init == "paper"  # explicit wins
    assert mixed.to_dict()["train"]["recipe"] == "authors"  # the run records its recipe
    with pytest.raises(ValueError, match=r"train.recipe: must be one of \['authors', 'paper'\]"):
        RunConfig.from_dict({"model": MODEL, "train": {"recipe": "mine"}})


def test_memory_decay_all_moves_gains_and_cores_to_the_decay_group():
    model = LanguageModel(RunConfig.from_dict({"model": MODEL}).model)
    default = {g: {n for n, _ in ps} for g, ps in split_param_groups(model).items()}
    all_decay = {g: {n for n, _ in ps} for g, ps in split_param_groups(model, decay_memory_all=True).items()}
    moved = {"memory.0.retrieval.cores", "memory.0.retrieval.q_row_norm", "memory.0.retrieval.k_col_norm"}
    assert moved <= default["no_decay"] and moved <= all_decay["decay"]
    assert "blocks.0.norm1.weight" in all_decay["no_decay"]  # the rest of the model is as before
    assert default["values"] == all_decay["values"] == {"memory.0.values.weight"}
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, value_weight_decay=0.1, decay_memory_all=True)
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays["decay"] == 0.1 and decays["values"] == 0.1
