"""A checkpoint written by ultramem 0.1 (before the config base and the MemoryLayer contract) still
loads and gives the logits it gave then. The fixture was written by commit 1bdfca8's code (a tiny
LM with an UltraMem memory and a query conv, 2 AdamW steps); expected.json holds its own logits."""

import json
from pathlib import Path

import torch

from ultramem.checkpoint import load_checkpoint, read_checkpoint_meta
from ultramem.model import LanguageModel, LMConfig
from ultramem.optim import build_optimizer
from ultramem.runs import load_run, normalize_model_config

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt_v0_1"


def test_a_0_1_checkpoint_loads_with_its_logits():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model, _, _, ckpt = load_run(FIXTURE)
    assert ckpt.step == 2
    saved = read_checkpoint_meta(FIXTURE)["model_config"]
    assert saved["memory"] == {"num_keys": 4, "key_dim": 8, "value_dim": 8, "topk": 4, "query_conv": True}
    assert model.cfg.memory.query_conv and model.cfg.memory.dim == 16  # now a typed config
    with torch.no_grad():
        logits, _ = model(torch.tensor(expected["input"]))
    torch.testing.assert_close(logits[0, :2, :5], torch.tensor(expected["logits_first"]), rtol=0, atol=1e-6)
    assert abs(float(logits.double().sum()) - expected["logits_sum"]) < 1e-3


def test_a_0_1_checkpoint_resumes_with_its_optimizer_state():
    cfg = LMConfig.from_dict(read_checkpoint_meta(FIXTURE)["model_config"])
    model = LanguageModel(cfg)
    opt = build_optimizer(model, lr=1e-2, total_steps=4)
    ckpt = load_checkpoint(FIXTURE, model, opt, expect_model_config=cfg.to_dict(),
                           normalize_config=normalize_model_config)
    state = opt.state_dict()["adamw"]["state"]
    assert ckpt.step == 2 and state and all(int(s["step"]) == 2 for s in state.values())
