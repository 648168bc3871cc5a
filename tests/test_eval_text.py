"""`ultramem eval RUN --data PATH`: loss and bits per byte of a run on any text, its own tokenizer."""

import json
import math
from pathlib import Path

import torch

from ultramem.cli import main
from ultramem.data import Tokenizer
from ultramem.eval import text_loss
from ultramem.model import LanguageModel, LMConfig
from ultramem.train import RunConfig, train

TEXT = Path(__file__).parent / "fixtures" / "text"


def _tiny_model_and_tokenizer():
    docs = [p.read_text() for p in sorted((TEXT / "train").glob("*.txt"))]
    tok = Tokenizer.train(docs, vocab_size=300)
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32))
    return model, tok, docs


def test_bits_per_byte_is_the_summed_loss_over_the_text_bytes():
    model, tok, docs = _tiny_model_and_tokenizer()
    res = text_loss(model, tok, docs, seq_len=16, batch_size=3)
    n_bytes = sum(len(d.encode()) for d in docs)
    targets = sum(len(tok.encode(d)) for d in docs)  # every document token, none of the separators
    assert res["bytes"] == n_bytes and res["tokens"] == targets and res["documents"] == len(docs)
    assert abs(res["bits_per_byte"] - res["loss"] * targets / math.log(2) / n_bytes) < 1e-9
    # the same sum from one window at a time (no batching, no padding), written out here
    stream = [t for d in docs for t in [tok.eos_id] + tok.encode(d)]
    nats = 0.0
    for s in range(0, len(stream) - 1, 16):
        w = torch.tensor([stream[s: s + 17]])
        logits, _ = model(w[:, :-1])
        keep = w[0, 1:] != tok.eos_id
        nats += torch.nn.functional.cross_entropy(logits[0][keep], w[0, 1:][keep], reduction="sum").item()
    assert abs(res["loss"] * res["tokens"] - nats) < 1e-3 * max(1.0, nats / 1000)


def test_eval_data_command_on_a_run(tmp_path, capsys):
    cfg = RunConfig.from_dict({
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "data": {"source": "text", "train_path": str(TEXT / "train"), "val_path": str(TEXT / "val"),
                 "vocab_size": 300},
        "train": {"out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "steps": 2,
                  "batch_size": 2, "seq_len": 16, "warmup_steps": 0, "eval_every": 0, "progress": False}})
    train(cfg, log=lambda *_: None)
    capsys.readouterr()  # drop the training's own output
    assert main(["eval", str(tmp_path / "run"), "--data", str(TEXT / "val")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bits_per_byte"] > 0 and out["tokens"] > 0 and out["data"] == str(TEXT / "val")
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "nope")]) == 2
    assert "--data: must be an existing folder, file or glob" in capsys.readouterr().err
