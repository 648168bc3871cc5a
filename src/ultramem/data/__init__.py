"""Data for ultramem language models: sources, BPE tokenizer, cached token files, batch samplers.

Typical use from a trainer:

    cfg = DataConfig(source="facts", num_people=500, vocab_size=1024)   # or DataConfig.from_dict(d)
    data = prepare_data(cfg, cache_dir="cache/data")   # tokenises once, then reuses the cache
    model_vocab = data.vocab_size
    train = data.train_sampler(batch_size=32, seq_len=128, seed=0)
    x_BT, y_BT = next(train)                            # checkpoint: train.state_dict()
    train.load_state_dict(ckpt["data"])                 # resume: identical batches from there on
    for x_BT, y_BT in data.val_batches(32, 128, max_windows=256): ...   # same windows every eval
    queries = [q for q in data.fact_queries if q.heldout][:500]
    prompt_ids = data.encode_prompt(queries[0].prompt)  # <|endoftext|> + prompt
    # greedy-decode data.max_answer_tokens() + 1 tokens per prompt, decode with data.tokenizer, then
    report = fact_recall_report(queries, continuations) # accuracy, by_attribute, chance
"""

from .config import SOURCES, DataConfig
from .facts import (
    ATTRIBUTES,
    DEFAULT_ATTRIBUTES,
    FactConfig,
    FactCorpus,
    FactQuery,
    build_fact_corpus,
    extract_attribute,
    fact_recall_accuracy,
    fact_recall_report,
)
from .prepare import PreparedData, cache_key, load_prepared, prepare_data, token_dtype
from .sampler import TrainBatchSampler, ValBatches
from .sources import Documents, load_documents, split_documents
from .tokenizer import EOS_TOKEN, Tokenizer

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_ATTRIBUTES",
    "EOS_TOKEN",
    "SOURCES",
    "DataConfig",
    "Documents",
    "FactConfig",
    "FactCorpus",
    "FactQuery",
    "PreparedData",
    "Tokenizer",
    "TrainBatchSampler",
    "ValBatches",
    "build_fact_corpus",
    "cache_key",
    "extract_attribute",
    "fact_recall_accuracy",
    "fact_recall_report",
    "load_documents",
    "load_prepared",
    "prepare_data",
    "split_documents",
    "token_dtype",
]
