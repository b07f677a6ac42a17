"""Built-in demo data and base model: nothing to download.

- :mod:`hf_moeprune.demo.corpus`: the Python standard library as a two-domain corpus (``code`` = source
  without docstrings, ``prose`` = the docstrings), split by file, cached.
- :mod:`hf_moeprune.demo.base_model`: a byte-level BPE tokenizer trained on it and a small Mixtral-style MoE
  pretrained on both domains with ``Trainer``, cached, plus the measures of expert specialisation.
- :mod:`hf_moeprune.demo.pipeline`: the ``hf-moeprune demo`` run.
- :mod:`hf_moeprune.demo.tiny_models` and :mod:`hf_moeprune.demo.loopback_hub`: tiny random models of every
  family and a loopback Hub stand-in, used by the demo, the tests, the examples and the benchmarks. They are
  tools, not library API (``hf_moeprune`` does not export them).

Typical use::

    from hf_moeprune.demo import build_corpus, load_or_train_base_model
    model_dir = load_or_train_base_model()   # a few minutes the first time, instant afterwards
    corpus = build_corpus()                  # corpus.code / corpus.prose / corpus.mixed: DatasetDicts
"""

from importlib import import_module

# name -> defining module, imported on first access: the tests import ``hf_moeprune.demo.tiny_models`` and need
# neither ``datasets`` nor the tokenizer trainer that the base model pulls in
_LAZY = {
    **dict.fromkeys(
        [
            "BaseModelConfig",
            "TokenizerConfig",
            "expert_histogram",
            "jensen_shannon",
            "load_or_train_base_model",
            "load_or_train_tokenizer",
            "measure_domains",
            "normalized_entropy",
            "specialisation_report",
            "tokenize_and_pack",
            "unigram_cross_entropy",
        ],
        "hf_moeprune.demo.base_model",
    ),
    **dict.fromkeys(["Corpus", "CorpusConfig", "build_corpus", "cache_root"], "hf_moeprune.demo.corpus"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_moeprune.demo' has no attribute {name!r}")


__all__ = sorted(_LAZY)
