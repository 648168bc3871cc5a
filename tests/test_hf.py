"""Hugging Face integration (ultramem.hf): AutoModel round trips, generate, Trainer, export-hf,
add_memory on real Llama / Qwen2 / GPT-2 classes (tiny random configs; nothing is downloaded)."""

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers",
                                   reason="transformers not installed (pip install 'ultramem[hf]')")
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import ultramem.hf as uh  # noqa: E402
from ultramem.cli import main  # noqa: E402
from ultramem.config import PKMConfig, UltraMemConfig  # noqa: E402
from ultramem.train import load_run  # noqa: E402

MEM = {"num_keys": 8, "key_dim": 16, "heads": 2, "topk": 4}
KINDS = {
    "dense": {},
    "moe": {"moe_experts": 4, "moe_topk": 2},
    "pkm": {"memory_placement": "0:1", "memory": {**MEM, "query_norm": "layer"}},
    "ultramem": {"memory_placement": "0:0/1:2", "memory": {**MEM, "query_conv": True}},
    "ultramem_v2": {"memory": {"num_keys": 8, "key_dim": 16, "value_dim": 16, "pre_value_dim": 8, "topk": 8}},
}


def tiny_lm(ffn, seed=0):
    torch.manual_seed(seed)
    cfg = uh.UltraMemLMConfig(lm_config={"vocab_size": 97, "dim": 32, "n_layers": 3, "n_heads": 2,
                                         "max_seq_len": 48, "ffn": ffn, **KINDS[ffn]})
    return uh.UltraMemForCausalLM(cfg).eval()


@pytest.mark.parametrize("ffn", list(KINDS))
def test_auto_round_trip_identical_logits(tmp_path, ffn):
    model = tiny_lm(ffn)
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(x).logits
    shard = "30KB" if ffn == "ultramem" else "2GB"  # the memory model: several safetensors files
    model.save_pretrained(tmp_path, max_shard_size=shard)
    if ffn == "ultramem":
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is uh.UltraMemForCausalLM and loaded.config.lm_config == model.config.lm_config
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    if ffn == "ultramem_v2":  # the shared value pool is stored once and shared again after loading
        first, *rest = [m.values.weight for m in loaded.model.memory]
        assert rest and all(w is first for w in rest)


@pytest.mark.parametrize("ffn", list(KINDS))
def test_generate_equals_library_greedy(ffn):
    model = tiny_lm(ffn, seed=1)
    x = torch.randint(0, 97, (2, 6))
    want = model.model.generate(x, 10, temperature=0)
    mask = torch.ones_like(x)  # no padding (token 0 would otherwise be taken for pad_token_id=0)
    got = model.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    uncached = model.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(uncached, want)


def test_trainer_steps_change_weights(tmp_path):
    model = tiny_lm("ultramem").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (8, 16), generator=g)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", logging_steps=1, use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=[uh.AfterOptimizerStepCallback()])
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    after = model.state_dict()
    assert not torch.equal(after["model.memory.0.values.weight"], before["model.memory.0.values.weight"])
    assert not torch.equal(after["model.tok_emb.weight"], before["model.tok_emb.weight"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step `ultramem train` run of the tiny-ultramem preset on a 12-person fact corpus."""
    tmp = tmp_path_factory.mktemp("run")
    tiny = ["--set", "model.dim=32", "--set", "model.n_heads=2", "--set", "data.num_people=12",
            "--set", "data.vocab_size=300", "--set", "data.fact_repetitions=2", "--set", "train.steps=2",
            "--set", "train.warmup_steps=1", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
            "--set", "train.fact_queries=0", "--set", "train.eval_windows=1", "--set", "train.threads=1",
            "--set", "train.memory_diagnostics=false", "--set", f"train.cache_dir={tmp / 'cache'}",
            "--no-progress"]
    assert main(["train", "--preset", "tiny-ultramem", "--out", str(tmp / "run"), *tiny]) == 0
    return tmp / "run"


def test_export_hf_matches_ultramem_generate(tmp_path, tiny_run, capsys):
    run, out = tiny_run, tmp_path / "hf"
    assert main(["export-hf", str(run), str(out)]) == 0
    capsys.readouterr()
    lm, _, tok, _ = load_run(run)
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    prompt = "The birth city of Alma"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.eos_id] + tok.encode(prompt)
    want = lm.generate(ids, 12, temperature=0, eos_id=tok.eos_id)  # what `ultramem generate` runs
    got = hf_model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert hf_tok.decode(got[0], skip_special_tokens=True).startswith(prompt)


# ---------------------------------------------------------------- add_memory

def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


FAMILIES = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_add_memory_unchanged_at_init_and_trains_only_memory(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        ref = model(x).logits
    uh.add_memory(model, UltraMemConfig(dim=32, **MEM), placement="0:1/2:2")
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    n_mem = sum(p.numel() for p in uh.memory_parameters(model))
    assert uh.freeze_except_memory(model) == n_mem > 0
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        for layer in uh.augment.memory_layers(model):
            layer.after_optimizer_step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == name.startswith("ultramem_memory."), name
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, ref)  # the trained memory now contributes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_augmented_save_load_generate(tmp_path, family):
    torch.manual_seed(1)
    model = FAMILIES[family]().eval()
    uh.add_memory(model, {"kind": "pkm", **MEM} if family == "gpt2" else MEM, placement="1:2")
    with torch.no_grad():  # a trained-looking memory, so the round trip is not trivially zero
        for p in uh.memory_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    for layer in uh.augment.memory_layers(model):
        layer.after_optimizer_step()
    x = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.ultramem_memory["placement"] == "1:2"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
        assert torch.equal(copy.deepcopy(loaded)(x).logits, ref)  # hooks follow the copy
    cached = loaded.generate(x[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = loaded.generate(x[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("placement, match", [
    ("0:3", "out of range"), ("2:1", "out of range"), ("0:1/1:2", "overlap"), ("a:b", "malformed"),
    ("", "placement"),
])
def test_bad_placements(placement, match):
    with pytest.raises(ValueError, match=match):
        uh.add_memory(llama(), MEM, placement=placement)


def test_bad_models_and_configs():
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="unsupported architecture OPTForCausalLM"):
        uh.add_memory(opt, MEM, placement="0:0")
    with pytest.raises(ValueError, match="memory_config.dim"):
        uh.add_memory(llama(), PKMConfig(dim=64, num_keys=8, key_dim=16, topk=4), placement="0:0")
    with pytest.raises(ValueError, match="query_conv"):
        uh.add_memory(llama(), {**MEM, "query_conv": True}, placement="0:0")
    model = uh.add_memory(llama(), MEM, placement="0:0")
    with pytest.raises(ValueError, match="already has memory"):
        uh.add_memory(model, MEM, placement="2:2")
    with pytest.raises(ValueError, match="no memory layers"):
        uh.freeze_except_memory(llama())


def test_finetune_compares_methods(tmp_path, tiny_run):
    from ultramem.hf.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(new_people=2, steps=2, batch_size=2, seq_len=16, eval_windows=1, old_fact_queries=2,
                         fact_max_new_tokens=3, memory={"num_keys": 8, "key_dim": 16, "heads": 2, "topk": 4},
                         sparse_rows=4, background_batches=2)
    res = run_finetune(tiny_run, tmp_path / "ft", cfg, log=lambda m: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["before", "memory", "memory_values", "memory_sparse", "full", "lora"]
    full = rows["full"]["trainable"]
    assert 0 < rows["memory_values"]["trainable"] < rows["memory"]["trainable"]
    assert 0 < rows["lora"]["trainable"] < full
    for r in rows.values():
        assert r["orig_val_loss"] > 0 and 0 <= r["new_fact_acc_seen"] <= 1
    assert (tmp_path / "ft" / "table.md").read_text().startswith("| method")
    with pytest.raises(ValueError, match="methods"):
        FinetuneConfig(methods=("memory", "adapters"))


def test_sparse_row_selector_keeps_only_top_rows():
    from ultramem.hf.finetune import _RowSelector
    from ultramem.values import ValueTable

    table = ValueTable(6, 4, num_chunks=2)
    sel = _RowSelector([table], top=2)
    sel.idf = [torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 1.0])]  # row 2: read by every background batch
    table.count_reads(True)
    table.read_counts += torch.tensor([5, 0, 9, 1, 3, 0])  # scores 5, 0, 0, 2, 3, 0 -> rows 0 and 4
    table.weight.grad = torch.ones_like(table.weight)
    sel.mask_grads()
    kept = table.weight.grad.view(6, 4).abs().sum(1) > 0
    assert kept.tolist() == [True, False, False, False, True, False]
