"""The demo's tokenizer and base model: a small Mixtral-style MoE pretrained on code + prose.

Both are trained on :mod:`hf_moeprune.demo.corpus` and cached next to it (same cache root, same
all-or-nothing :func:`~hf_moeprune.demo.corpus.cached_build`). The model folder holds the tokenizer too, so
``AutoModelForCausalLM.from_pretrained(d)`` and ``AutoTokenizer.from_pretrained(d)`` both work on it.

Pretraining uses the stock :class:`transformers.Trainer` with the router's load-balancing loss on
(``output_router_logits=True``; the aux loss is skipped without it, transformers issue 44242) so experts
do not collapse onto a few. Whether experts specialised is measured, not assumed:
:func:`measure_domains` routes held-out code and prose through the model (counting with
:mod:`hf_moeprune.observation`, like the trainer) and :func:`specialisation_report`
compares the two domains' expert-usage histograms per layer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_moeprune.data import tokenize_and_pack
from hf_moeprune.demo.corpus import (
    DOMAINS,
    Corpus,
    CorpusConfig,
    build_corpus,
    cache_root,
    cached_build,
    config_hash,
)
from hf_moeprune.observation import observe_routing, routed_counts

logger = logging.getLogger(__name__)

TOKENIZER_FORMAT_VERSION = 1
BASE_MODEL_FORMAT_VERSION = 1
TOKENIZER_MARKER = "tokenizer_config.json"
BUILD_INFO = "build_info.json"
SPECIAL_TOKENS: dict[str, str] = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
# an expert counts as a specialist of a domain when under this share of its (domain-balanced) load is the other's
SPECIALIST_SHARE = 0.2
# what the base model can be pretrained on: both domains interleaved, or one domain only (for a domain shift)
PRETRAIN_DOMAINS = ("mixed", *DOMAINS)


# -- tokenizer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = field(default=4096, metadata={"help": "byte-level BPE vocabulary size, special tokens included"})
    min_frequency: int = field(default=2, metadata={"help": "a pair must occur this often to be merged"})
    model_max_length: int = field(default=512, metadata={"help": "longest sequence the tokenizer announces"})

    def __post_init__(self):
        # 256 byte symbols + the special tokens must fit
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={self.vocab_size} must be at least {256 + len(SPECIAL_TOKENS)}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency={self.min_frequency} must be >= 1")
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length={self.model_max_length} must be >= 1")


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``: any string round-trips through encode/decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = config or TokenizerConfig()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=logger.isEnabledFor(logging.INFO),
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=config.model_max_length,
        # code is whitespace-sensitive: decode must give back exactly what was encoded
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


def tokenizer_dir(corpus: Corpus, config: TokenizerConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    key = config_hash(TOKENIZER_FORMAT_VERSION, corpus.fingerprint, config, transformers.__version__)
    return cache_root(cache_dir) / "demo" / f"tokenizer-{key}"


def load_or_train_tokenizer(
    corpus: Corpus | None = None,
    config: TokenizerConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """The demo tokenizer, trained on the mixed corpus's train split the first time, then loaded from the cache.

    Its ``name_or_path`` is the cache folder, which ``AutoTokenizer.from_pretrained`` accepts.
    """
    config = config or TokenizerConfig()
    corpus = corpus or build_corpus(cache_dir=cache_dir)
    path = tokenizer_dir(corpus, config, cache_dir)

    def build(tmp: Path) -> None:
        texts = list(corpus.mixed["train"]["text"])
        logger.info("training a %d-token byte-level BPE on %d texts", config.vocab_size, len(texts))
        train_tokenizer(texts, config).save_pretrained(str(tmp))

    built = cached_build(path, build, marker=TOKENIZER_MARKER)
    logger.info("%s tokenizer at %s", "trained" if built else "loaded cached", path)
    return AutoTokenizer.from_pretrained(str(path))


# -- packing -----------------------------------------------------------------------------------------------


# -- base model --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelConfig:
    """Architecture and pretraining recipe of the demo base model (defaults tuned for a 2-core CPU)."""

    hidden_size: int = field(default=128, metadata={"help": "model width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers (all MoE)"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    num_key_value_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    intermediate_size: int = field(default=256, metadata={"help": "hidden width of each expert"})
    num_local_experts: int = field(default=16, metadata={"help": "experts per layer"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "experts each token is routed to (top-k)"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss"})
    block_size: int = field(default=128, metadata={"help": "tokens per packed training block"})
    max_steps: int = field(default=800, metadata={"help": "optimizer steps"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "blocks per step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate (cosine decay)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    experts_implementation: str = field(
        default="grouped_mm", metadata={"help": f"transformers experts kernel, one of {EXPERTS_IMPLEMENTATIONS}"}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads while training (None: the CPUs this process may use)"}
    )
    eval_blocks: int = field(default=128, metadata={"help": "held-out blocks per domain for the build report"})
    pretrain_domain: str = field(
        default="mixed",
        metadata={"help": f"corpus domain pretrained on, one of {PRETRAIN_DOMAINS} (one domain: a later fine-tune "
                  "on the other is a domain shift)"},
    )  # fmt: skip

    def __post_init__(self):
        positive = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "num_local_experts",
            "num_experts_per_tok",
            "max_steps",
            "per_device_train_batch_size",
            "eval_blocks",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}"
            )
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be >= 2")
        if self.learning_rate <= 0 or self.router_aux_loss_coef < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"learning_rate={self.learning_rate} must be > 0, router_aux_loss_coef={self.router_aux_loss_coef} "
                f"and warmup_steps={self.warmup_steps} >= 0"
            )
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation={self.experts_implementation!r}; known: {list(EXPERTS_IMPLEMENTATIONS)}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be None or >= 1")
        if self.pretrain_domain not in PRETRAIN_DOMAINS:
            raise ValueError(f"pretrain_domain={self.pretrain_domain!r}; known: {list(PRETRAIN_DOMAINS)}")


def mixtral_config(config: BaseModelConfig, tokenizer: PreTrainedTokenizerFast) -> transformers.MixtralConfig:
    """The transformers config of the demo model; its vocabulary and special ids come from ``tokenizer``."""
    return transformers.MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size,
        num_local_experts=config.num_local_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        max_position_embeddings=max(tokenizer.model_max_length, config.block_size),
        output_router_logits=True,
        router_aux_loss_coef=config.router_aux_loss_coef,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def init_model(config: BaseModelConfig, tokenizer: PreTrainedTokenizerFast) -> transformers.PreTrainedModel:
    """A freshly initialised demo model, identical for the same ``config.seed``."""
    transformers.set_seed(config.seed)
    model = transformers.AutoModelForCausalLM.from_config(mixtral_config(config, tokenizer))
    model.set_experts_implementation(config.experts_implementation)
    return model


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pretrain(
    model: transformers.PreTrainedModel, train_blocks: Dataset, config: BaseModelConfig, work_dir: str | os.PathLike
) -> transformers.trainer_utils.TrainOutput:
    """Pretrain ``model`` in place on packed blocks with the stock ``Trainer`` (tqdm progress, no checkpoints)."""
    args = transformers.TrainingArguments(
        output_dir=str(work_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=max(1, config.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train_blocks, data_collator=transformers.default_data_collator
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or _default_threads())
    try:
        return trainer.train()
    finally:
        torch.set_num_threads(threads)


def base_model_dir(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, config: BaseModelConfig, cache_dir: str | os.PathLike | None
) -> Path:
    # threads change float reduction order only, not the recipe
    recipe = dataclasses.asdict(dataclasses.replace(config, num_threads=None))
    if recipe["pretrain_domain"] == "mixed":
        # the default keeps the key it had before the field existed, so cached demo models stay valid
        del recipe["pretrain_domain"]
    key = config_hash(
        BASE_MODEL_FORMAT_VERSION,
        corpus.fingerprint,
        Path(tokenizer.name_or_path).name,
        recipe,
        transformers.__version__,
    )
    return cache_root(cache_dir) / "demo" / f"base-model-{key}"


def load_or_train_base_model(
    config: BaseModelConfig | None = None,
    corpus_config: CorpusConfig | None = None,
    tokenizer_config: TokenizerConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The folder of the pretrained demo model (weights + tokenizer + ``build_info.json``), built if missing.

    A first call builds the corpus, the tokenizer and the model (a few minutes on a 2-core CPU); later calls
    return the cached folder at once.
    """
    config = config or BaseModelConfig()
    corpus = build_corpus(cache_dir=cache_dir, config=corpus_config)
    tokenizer = load_or_train_tokenizer(corpus, tokenizer_config, cache_dir)
    path = base_model_dir(corpus, tokenizer, config, cache_dir)

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        # the per-domain sets are only measured, so only their validation split is packed
        pretrain_texts = DatasetDict(train=corpus[config.pretrain_domain]["train"])
        packed = {"pretrain": tokenize_and_pack(pretrain_texts, tokenizer, config.block_size)}
        for domain in ("code", "prose"):
            held_out = DatasetDict(validation=corpus[domain]["validation"])
            packed[domain] = tokenize_and_pack(held_out, tokenizer, config.block_size)
        pack_s = time.perf_counter() - start
        model = init_model(config, tokenizer)
        logger.info(
            "pretraining a %.2fM-parameter MoE for %d steps on %d blocks of %d tokens",
            model.num_parameters() / 1e6,
            config.max_steps,
            len(packed["pretrain"]["train"]),
            config.block_size,
        )
        cpu_start, start = time.process_time(), time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hf_moeprune-trainer-") as work_dir:
            result = pretrain(model, packed["pretrain"]["train"], config, work_dir)
        train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        model.eval()
        model.config.use_cache = True  # Trainer turns the KV cache off for training; generation wants it back
        measured = measure_domains(
            model,
            {d: packed[d]["validation"] for d in ("code", "prose")},
            max_blocks=config.eval_blocks,
            unigram_counts=token_counts(packed["pretrain"]["train"], len(tokenizer)),
        )
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {
            "format_version": BASE_MODEL_FORMAT_VERSION,
            "recipe": dataclasses.asdict(config),
            "corpus": str(corpus.path),
            "corpus_fingerprint": corpus.fingerprint,
            "tokenizer": str(tokenizer.name_or_path),
            "num_parameters": model.num_parameters(),
            "train_blocks": len(packed["pretrain"]["train"]),
            "tokens_seen": config.max_steps * config.per_device_train_batch_size * config.block_size,
            "final_train_loss": result.training_loss,
            "pack_seconds": round(pack_s, 2),
            "train_seconds": round(train_s, 2),
            "train_cpu_seconds": round(train_cpu_s, 2),
            "torch_threads": config.num_threads or _default_threads(),
            "held_out": specialisation_report(measured),
        }
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=1))

    built = cached_build(path, build, marker=BUILD_INFO)
    logger.info("%s base model at %s", "trained" if built else "loaded cached", path)
    return path


# -- measuring specialisation (pure maths first) ---------------------------------------------------------


def expert_histogram(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """How many of the ``[tokens, experts]`` router logits' top-``top_k`` picks went to each expert.

    Only for a plain top-k router given nothing but its logits; :func:`measure_domains` counts what the routers
    actually chose (score correction bias, groups) through :mod:`hf_moeprune.observation`."""
    picks = router_logits.topk(top_k, dim=-1).indices
    return routed_counts(picks, router_logits.shape[-1]).to(torch.float64)


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of a usage histogram divided by log(#experts): 1.0 is perfectly even, 0.0 one expert only."""
    p = counts.double() / counts.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(counts.numel())) if counts.numel() > 1 else 0.0


def jensen_shannon(p_counts: torch.Tensor, q_counts: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two usage histograms (0: same usage, 1: disjoint experts)."""
    p = p_counts.double() / p_counts.sum()
    q = q_counts.double() / q_counts.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log2()).sum()

    return float((kl(p, m) + kl(q, m)) / 2)


def token_counts(blocks: Dataset, vocab_size: int) -> torch.Tensor:
    """Token frequencies of packed blocks (for the unigram baseline)."""
    ids = torch.tensor(list(blocks["input_ids"]), dtype=torch.long).reshape(-1)
    return torch.bincount(ids, minlength=vocab_size).to(torch.float64)


def unigram_cross_entropy(train_counts: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy (nats/token) of ``targets`` under the add-one-smoothed unigram of ``train_counts``.

    The loss a model that ignores context entirely would reach: the bar a language model must clear.
    """
    log_p = ((train_counts + 1) / (train_counts.sum() + train_counts.numel())).log()
    return float(-log_p[targets.reshape(-1)].mean())


@torch.no_grad()
def measure_domains(
    model: transformers.PreTrainedModel,
    blocks_by_domain: Mapping[str, Dataset],
    batch_size: int = 32,
    max_blocks: int | None = None,
    unigram_counts: torch.Tensor | None = None,
) -> dict[str, dict]:
    """Per domain: next-token loss (nats, aux loss excluded), tokens, and per-MoE-layer expert-usage histograms
    (tokens routed to each expert as the routers chose them).

    Uses the first ``max_blocks`` blocks of each domain, so the numbers are reproducible.
    """
    out: dict[str, dict] = {}
    for domain, blocks in blocks_by_domain.items():
        n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
        if n == 0:
            raise ValueError(f"domain {domain!r} has no held-out blocks to measure")
        ids = torch.tensor(list(blocks.select(range(n))["input_ids"]), dtype=torch.long)
        loss_sum = [0.0]

        def add_loss(batch, output, loss_sum=loss_sum):
            logits = output.logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:].reshape(-1)
            loss_sum[0] += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum"))

        stats = observe_routing(
            model,
            [{"input_ids": ids[start : start + batch_size]} for start in range(0, n, batch_size)],
            record_reap=False,
            forward_kwargs={"use_cache": False},
            on_output=add_loss,
            progress=False,
        ).snapshot()
        histograms = torch.stack([stats[layer].tokens for layer in sorted(stats)])
        predicted = n * (ids.shape[1] - 1)
        out[domain] = {"loss": loss_sum[0] / predicted, "tokens": predicted, "histograms": histograms}
        if unigram_counts is not None:
            out[domain]["unigram_loss"] = unigram_cross_entropy(unigram_counts, ids[:, 1:])
    return out


def specialisation_report(measured: Mapping[str, dict]) -> dict:
    """JSON-ready summary of :func:`measure_domains` for exactly two domains (``code`` and ``prose``).

    Per layer: Jensen-Shannon divergence between the domains' expert usage, each domain's normalised load
    entropy and usage shares, each expert's share of the first domain among the tokens it received (after
    weighting the domains equally, so 0.5 means no preference), and how many experts are specialists
    (share beyond ``SPECIALIST_SHARE`` either way) or dead.
    """
    if len(measured) != 2:
        raise ValueError(f"specialisation_report compares two domains, got {sorted(measured)}")
    (a, ma), (b, mb) = measured.items()
    layers = []
    for layer, (ha, hb) in enumerate(zip(ma["histograms"], mb["histograms"])):
        pa, pb = ha / ha.sum(), hb / hb.sum()
        share_a = [float(x / (x + y)) if x + y > 0 else None for x, y in zip(pa.tolist(), pb.tolist())]
        layers.append(
            {
                "layer": layer,
                "js_divergence_bits": round(jensen_shannon(ha, hb), 4),
                f"entropy_{a}": round(normalized_entropy(ha), 4),
                f"entropy_{b}": round(normalized_entropy(hb), 4),
                f"usage_{a}": [round(float(x), 4) for x in pa],
                f"usage_{b}": [round(float(x), 4) for x in pb],
                # None: the expert received no token of either domain (a dead expert)
                f"{a}_preference": [None if x is None else round(x, 3) for x in share_a],
                f"experts_mostly_{a}": sum(x is not None and x > 1 - SPECIALIST_SHARE for x in share_a),
                f"experts_mostly_{b}": sum(x is not None and x < SPECIALIST_SHARE for x in share_a),
                "dead_experts": sum(x is None for x in share_a),
            }
        )
    domains = {
        name: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items() if k != "histograms"}
        for name, m in measured.items()
    }
    return {
        "domains": domains,
        "mean_js_divergence_bits": round(sum(x["js_divergence_bits"] for x in layers) / len(layers), 4),
        "layers": layers,
    }
