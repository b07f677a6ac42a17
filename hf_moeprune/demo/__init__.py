"""Built-in demo data and base model: nothing to download.

- :mod:`hf_moeprune.demo.corpus`: the Python standard library as a two-domain corpus (``code`` = source
  without docstrings, ``prose`` = the docstrings), split by file, cached.
- :mod:`hf_moeprune.demo.base_model`: a byte-level BPE tokenizer trained on it and a small Mixtral-style MoE
  pretrained on both domains with ``Trainer``, cached, plus the measures of expert specialisation.

Typical use::

    from hf_moeprune.demo import build_corpus, load_or_train_base_model
    model_dir = load_or_train_base_model()   # a few minutes the first time, instant afterwards
    corpus = build_corpus()                  # corpus.code / corpus.prose / corpus.mixed: DatasetDicts
"""

from hf_moeprune.demo.base_model import (
    BaseModelConfig,
    TokenizerConfig,
    expert_histogram,
    jensen_shannon,
    load_or_train_base_model,
    load_or_train_tokenizer,
    measure_domains,
    normalized_entropy,
    specialisation_report,
    tokenize_and_pack,
    unigram_cross_entropy,
)
from hf_moeprune.demo.corpus import Corpus, CorpusConfig, build_corpus, cache_root

__all__ = [
    "BaseModelConfig",
    "Corpus",
    "CorpusConfig",
    "TokenizerConfig",
    "build_corpus",
    "cache_root",
    "expert_histogram",
    "jensen_shannon",
    "load_or_train_base_model",
    "load_or_train_tokenizer",
    "measure_domains",
    "normalized_entropy",
    "specialisation_report",
    "tokenize_and_pack",
    "unigram_cross_entropy",
]
