"""DataConfig: one dataclass describing every data source (generated facts, text files, HF datasets).

Static rules are checked on construction; rules that need the file system (folders exist, corpus is
not empty) are checked when the data is prepared. Every error is a ValueError naming the field, the
rule and the given value. Only the fields that matter for the chosen source enter the cache key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .facts import ATTRIBUTES, DEFAULT_ATTRIBUTES, TEMPLATES_PER_ATTRIBUTE, FactConfig
from .tokenizer import min_vocab_size

SOURCES = ("facts", "text", "hf")

# Fields that only change where/how things are stored, not what the tokens are.
_NOT_IN_KEY = {"hf_cache_dir"}
_INT_FIELDS = ("max_docs", "vocab_size", "tokenizer_train_chars", "seed", "num_people",
               "fact_train_templates", "fact_heldout_templates", "fact_repetitions")
_COMMON = {"source", "tokenizer_path", "vocab_size", "tokenizer_train_chars"}
_BY_SOURCE = {
    "facts": {"seed", "num_people", "fact_attributes", "fact_train_templates",
              "fact_heldout_templates", "fact_repetitions"},
    "text": {"train_path", "val_path", "val_fraction", "max_docs"},
    "hf": {"hf_name", "hf_config", "hf_data_files", "hf_train_split", "hf_val_split",
           "hf_text_column", "hf_revision", "hf_streaming", "hf_cache_dir", "val_fraction", "max_docs"},
}


@dataclass
class DataConfig:
    source: str = "facts"  # "facts" | "text" | "hf"

    # --- text: a folder (all *.txt below it), a glob, or a single .txt file; one file = one document.
    # Without val_path, every k-th document (sorted by path) goes to val, k ~ 1/val_fraction.
    train_path: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.05
    max_docs: int | None = None  # cap on documents read (text and hf)

    # --- hf: `datasets.load_dataset(hf_name, hf_config, data_files=..., split=...)`.
    hf_name: str | None = None  # e.g. "roneneldan/TinyStories", or a builder such as "json"/"text"
    hf_config: str | None = None
    hf_data_files: str | list | dict | None = None
    hf_train_split: str = "train"
    hf_val_split: str | None = None  # None: split the train documents like the text source
    hf_text_column: str = "text"
    hf_revision: str | None = None
    hf_streaming: bool = False  # stream (then max_docs is required) instead of downloading it all
    hf_cache_dir: str | None = None  # None: the `datasets` default cache

    # --- tokenizer: load tokenizer_path if given, else train a byte-level BPE of vocab_size.
    tokenizer_path: str | None = None
    vocab_size: int = 1024
    tokenizer_train_chars: int = 10_000_000  # BPE is trained on a proportional sample this big

    # --- facts: the generated fact corpus (see facts.py for the design).
    seed: int = 0  # seed of the fact generator (the document split and the sampler do not use it)
    num_people: int = 500
    fact_attributes: tuple = DEFAULT_ATTRIBUTES
    fact_train_templates: int = 5  # templates per attribute used in training text
    fact_heldout_templates: int = 1  # templates per attribute kept for evaluation only
    fact_repetitions: int = 5  # passes over all people in the training text

    def __post_init__(self):
        # Config files give lists; a tuple keeps it equal to a config built in code.
        if isinstance(self.fact_attributes, list):
            self.fact_attributes = tuple(self.fact_attributes)
        self.validate()

    def validate(self) -> None:
        """Check the rules that do not need the file system."""
        for name in _INT_FIELDS:
            v = getattr(self, name)
            optional = name == "max_docs" and v is None
            if not optional and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"{name}: must be an integer; got {v!r}")
        if not isinstance(self.val_fraction, (int, float)) or isinstance(self.val_fraction, bool):
            raise ValueError(f"val_fraction: must be a number; got {self.val_fraction!r}")
        if not isinstance(self.hf_streaming, bool):
            raise ValueError(f"hf_streaming: must be true or false; got {self.hf_streaming!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {list(SOURCES)}; got {self.source!r}")
        if self.tokenizer_path is None and self.vocab_size < min_vocab_size():
            raise ValueError(
                f"vocab_size: must be >= {min_vocab_size()} (256 bytes + <|endoftext|> + 1 merge); "
                f"got {self.vocab_size}"
            )
        if self.tokenizer_train_chars < 1:
            raise ValueError(f"tokenizer_train_chars: must be >= 1; got {self.tokenizer_train_chars}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1); got {self.val_fraction}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs: must be >= 1 or None; got {self.max_docs}")
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

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """Build from a plain dict (config file), rejecting unknown keys by name."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"data: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
        return cls(**d)


__all__ = ["ATTRIBUTES", "DataConfig", "SOURCES", "TEMPLATES_PER_ATTRIBUTE"]
