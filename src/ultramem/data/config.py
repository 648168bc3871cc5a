"""DataConfig: one dataclass describing every data source (generated facts, text files, HF datasets).

Static rules are checked on construction; rules that need the file system (folders exist, corpus is
not empty) are checked when the data is prepared. Every error is a ValueError naming the field, the
rule and the given value. Only the fields that matter for the chosen source enter the cache key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ..confbase import ConfigBase, param
from .facts import ATTRIBUTES, DEFAULT_ATTRIBUTES, TEMPLATES_PER_ATTRIBUTE, FactConfig
from .tokenizer import min_vocab_size

SOURCES = ("facts", "text", "hf")

# Fields that only change where/how things are stored, not what the tokens are.
_NOT_IN_KEY = {"hf_cache_dir"}
_COMMON = {"source", "tokenizer_path", "vocab_size", "tokenizer_train_chars"}
_BY_SOURCE = {
    "facts": {"seed", "num_people", "fact_attributes", "fact_train_templates",
              "fact_heldout_templates", "fact_repetitions"},
    "text": {"train_path", "val_path", "val_fraction", "max_docs"},
    "hf": {"hf_name", "hf_config", "hf_data_files", "hf_train_split", "hf_val_split",
           "hf_text_column", "hf_revision", "hf_streaming", "hf_cache_dir", "val_fraction", "max_docs"},
}


@dataclass
class DataConfig(ConfigBase):
    section = "data."

    source: Literal["facts", "text", "hf"] = param("facts", "`facts` (the generated fact corpus, offline), "
                                                   "`text` (.txt files) or `hf` (a `datasets` dataset)")
    # --- text: a folder (all *.txt below it), a glob, or a single .txt file; one file = one document.
    # Without val_path, every k-th document (sorted by path) goes to val, k ~ 1/val_fraction.
    train_path: str | None = param(None, "text: a folder (all *.txt below it), a glob or one .txt file")
    val_path: str | None = param(None, "text: val documents (null: every k-th train document, k ~ "
                                 "1/val_fraction)")
    val_fraction: float = param(0.05, "share of documents held out for val when there is no val split",
                                gt=0, lt=1)
    max_docs: int | None = param(None, "cap on documents read (text and hf)", ge=1)
    # --- hf: `datasets.load_dataset(hf_name, hf_config, data_files=..., split=...)`.
    hf_name: str | None = param(None, "hf: dataset name or builder (`json`, `text`, ...)")
    hf_config: str | None = param(None, "hf: dataset config")
    hf_data_files: str | list | dict | None = param(None, "hf: data_files for a builder")
    hf_train_split: str = param("train", "hf: train split")
    hf_val_split: str | None = param(None, "hf: val split (null: split the train documents)")
    hf_text_column: str = param("text", "hf: the text column")
    hf_revision: str | None = param(None, "hf: dataset revision")
    hf_streaming: bool = param(False, "hf: stream (then max_docs is required) instead of downloading all")
    hf_cache_dir: str | None = param(None, "hf: `datasets` cache (null: its default)")
    # --- tokenizer: load tokenizer_path if given, else train a byte-level BPE of vocab_size.
    tokenizer_path: str | None = param(None, "a `tokenizers` JSON to use (null: train a byte-level BPE)")
    vocab_size: int = param(1024, "BPE vocabulary size to train")
    tokenizer_train_chars: int = param(10_000_000, "BPE trained on a proportional sample this big", ge=1)
    # --- facts: the generated fact corpus (see facts.py for the design).
    seed: int = param(0, "seed of the fact generator (the document split and sampler do not use it)")
    num_people: int = param(500, "facts: people in the corpus")
    fact_attributes: tuple = param(DEFAULT_ATTRIBUTES, "facts: attributes per person")
    fact_train_templates: int = param(5, "facts: templates per attribute used in training text")
    fact_heldout_templates: int = param(1, "facts: templates per attribute kept for evaluation only")
    fact_repetitions: int = param(5, "facts: passes over all people in the training text")

    def __post_init__(self):
        # Config files give lists; a tuple keeps it equal to a config built in code.
        if isinstance(self.fact_attributes, list):
            self.fact_attributes = tuple(self.fact_attributes)
        super().__post_init__()  # every field's type, then `validate`

    def validate(self) -> None:
        """Check the rules that do not need the file system."""
        if self.tokenizer_path is None and self.vocab_size < min_vocab_size():
            raise ValueError(
                f"vocab_size: must be >= {min_vocab_size()} (256 bytes + <|endoftext|> + 1 merge); "
                f"got {self.vocab_size}"
            )
        if self.source == "text" and not self.train_path:
            raise ValueError(
                f"train_path: required for source 'text' (folder, glob or file); got {self.train_path!r}"
            )
        if self.source == "hf":
            if not self.hf_name:
                raise ValueError(f"hf_name: required for source 'hf'; got {self.hf_name!r}")
            if self.hf_streaming and self.max_docs is None:
                raise ValueError("max_docs: required when hf_streaming is true (streams never end); got None")
        if self.source == "facts":
            self.fact_config()  # FactConfig validates its own fields

    def fact_config(self) -> FactConfig:
        return FactConfig(
            seed=self.seed,
            num_people=self.num_people,
            attributes=tuple(self.fact_attributes),
            train_templates=self.fact_train_templates,
            heldout_templates=self.fact_heldout_templates,
            repetitions=self.fact_repetitions,
        )

    def key_fields(self) -> dict:
        """The fields that determine the token files, for the cache key (source-specific)."""
        keep = (_COMMON | _BY_SOURCE[self.source]) - _NOT_IN_KEY
        d = {k: v for k, v in asdict(self).items() if k in keep}
        if self.tokenizer_path is not None:  # a given tokenizer is fingerprinted by its content
            for k in ("tokenizer_path", "vocab_size", "tokenizer_train_chars"):
                d.pop(k)
        return d


__all__ = ["ATTRIBUTES", "DataConfig", "SOURCES", "TEMPLATES_PER_ATTRIBUTE"]
