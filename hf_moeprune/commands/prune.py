"""``hf-moeprune prune``: one-shot expert pruning from an explicit plan, a plan file, calibration statistics
(REAP and the other criteria) or statistics saved earlier."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class PruneCLIArguments:
    model: str = field(metadata={"help": "model path or Hub id"})
    output_dir: str = field(metadata={"help": "where to save the pruned model (must be new or empty)"})
    keep: str | None = field(
        default=None,
        metadata={"help": "explicit plan: JSON object mapping layer index to the expert indices to keep, "
                  "e.g. '{\"0\": [0, 2, 5]}'; give either --keep or --data"},
    )  # fmt: skip
    plan: str | None = field(
        default=None,
        metadata={"help": "explicit plan from a JSON file (the same object as --keep)"},
    )
    data: str | None = field(
        default=None,
        metadata={"help": "one-shot pruning from statistics on this calibration text (a saved dataset, .jsonl, "
                  "a text file or a folder); give one of --keep, --plan or --data"},
    )  # fmt: skip
    stats_in: str | None = field(
        default=None,
        metadata={"help": "plan from statistics saved earlier with --stats_out (no calibration pass); give one of "
                  "--keep, --plan, --data or --stats_in"},
    )  # fmt: skip
    stats_out: str | None = field(
        default=None, metadata={"help": "also save the collected statistics to this new folder (for other targets)"}
    )
    criterion: str = field(
        default="reap",
        metadata={"help": "expert score: reap | reap_frequency | ean | frequency | prob_mass | saliency"},
    )
    target: float = field(default=0.5, metadata={"help": "fraction of all routed experts to remove"})
    allocation: str = field(
        default="uniform", metadata={"help": "how removals spread over layers: uniform | global | laep"}
    )
    min_experts: int | None = field(default=None, metadata={"help": "floor per layer (default: top-k)"})
    multiple_of: int = field(default=1, metadata={"help": "keep per-layer counts divisible by this (e.g. ep_size)"})
    protect_super_experts: bool = field(
        default=False,
        metadata={"help": "never remove experts with outlier maximum activations (Super Experts): above the "
                  "super_expert_quantile of all experts' maxima and >= super_expert_ratio x the largest"},
    )  # fmt: skip
    super_expert_quantile: float = field(default=0.995, metadata={"help": "see --protect_super_experts"})
    super_expert_ratio: float = field(default=0.1, metadata={"help": "see --protect_super_experts"})
    drop_group_limited_routing: bool = field(
        default=False,
        metadata={"help": "for an explicit plan that cannot keep the groups of group-limited routing (n_group > 1): "
                  "route the pruned model without groups (n_group = topk_group = 1), a plain top-k over all kept "
                  "experts of a layer; changes which experts tokens may pick"},
    )  # fmt: skip
    merge: bool = field(
        default=False,
        metadata={"help": "fold each removed expert into its most similar kept expert (frequency-weighted average; "
                  "similarity of mean outputs on the calibration set) instead of dropping it"},
    )  # fmt: skip
    layerwise: bool = field(
        default=True,
        metadata={"help": "calibrate one decoder layer at a time from the safetensors checkpoint (memory: one "
                  "layer + the calibration hidden states); saliency and non-local models load the whole model"},
    )  # fmt: skip
    device: str | None = field(default=None, metadata={"help": "layer-wise calibration device (default: cuda if any)"})
    text_field: str = field(default="text", metadata={"help": "column holding the text"})
    messages_field: str = field(
        default="messages", metadata={"help": "JSONL field of chat turns, rendered with the tokenizer's chat template"}
    )
    calibration: str = field(
        default="packed",
        metadata={"help": "packed: block_size token blocks across documents | samples: one padded sequence per "
                  "document or conversation, cut to max_length"},
    )  # fmt: skip
    block_size: int = field(default=128, metadata={"help": "tokens per calibration block (packed)"})
    max_length: int = field(default=512, metadata={"help": "tokens per calibration sample at most (samples)"})
    max_blocks: int = field(default=256, metadata={"help": "calibration blocks or samples to route (at most)"})
    batch_size: int = field(default=8, metadata={"help": "blocks per forward pass"})
    export_stock: bool = field(
        default=True, metadata={"help": "write the stock architecture when every layer keeps the same count"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace a non-empty output_dir (once the new one is complete)"}
    )
    streaming: bool = field(
        default=True,
        metadata={"help": "apply a known plan shard by shard without loading the model (local safetensors "
                  "checkpoints; others are loaded in memory, with the reason logged)"},
    )  # fmt: skip
    max_shard_size: str = field(
        default="5GB", metadata={"help": "largest output shard of the streamed path (bounds its memory too)"}
    )

    def __post_init__(self):
        from hf_moeprune.pruning.allocation import AllocationSpec
        from hf_moeprune.pruning.criteria import get_criterion
        from hf_moeprune.streaming import parse_size

        given = [name for name in ("keep", "plan", "data", "stats_in") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of --keep (an explicit plan), --plan (a plan file) or --data (one-shot from "
                f"statistics) or --stats_in (saved statistics); got {', '.join(given) or 'none'}"
            )
        if self.calibration not in ("packed", "samples"):
            raise ValueError(f"calibration={self.calibration!r}; known: ['packed', 'samples']")
        if self.stats_out is not None and self.data is None:
            raise ValueError("--stats_out saves the statistics of a calibration pass; it needs --data")
        parse_size(self.max_shard_size)
        get_criterion(self.criterion)  # names the known criteria
        AllocationSpec(self.allocation)
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target={self.target} must be in [0, 1)")
        for name in ("multiple_of", "block_size", "max_length", "max_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.min_experts is not None and self.min_experts < 1:
            raise ValueError(f"min_experts={self.min_experts} must be >= 1")
        if self.keep is not None:
            parse_keep(self.keep)  # a malformed plan is refused here, before anything is read or written


def parse_keep(text: str, source: str = "--keep") -> dict[int, list[int]]:
    """``--keep`` as ``{layer: [expert, ...]}``; anything but a JSON object of integer layer keys to non-empty lists
    of distinct integers is refused, naming the offending part (0.5 is not expert 0)."""
    import json

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} {text!r} is not JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source} {text!r} must be a non-empty JSON object of layer -> expert indices")
    plan = {}
    for key, experts in raw.items():
        if not key.strip().isdigit():
            raise ValueError(f"{source}: layer key {key!r} is not a layer index (a non-negative integer)")
        bad = [e for e in experts if isinstance(e, bool) or not isinstance(e, int)] if isinstance(experts, list) else 1
        if bad or not experts:
            raise ValueError(
                f"{source}: layer {key} needs a non-empty list of integer expert indices, got {experts!r}"
                + (f" ({bad} not integers)" if isinstance(bad, list) else "")
            )
        if len(set(experts)) != len(experts):
            raise ValueError(f"{source}: layer {key} lists an expert twice: {experts}")
        plan[int(key)] = experts
    return plan


def check_top_k_fits(model) -> None:
    """A model whose top-k exceeds a layer's expert count cannot route; say so now, not at generation."""
    from hf_moeprune.adapters import get_adapter

    adapter = get_adapter(model)
    top_k = adapter.top_k(model.config)
    layers = adapter.decoder_layers(model)
    for index in adapter.moe_layer_indices(model):
        count = adapter.num_experts(layers[index])
        if top_k > count:
            raise ValueError(
                f"num_experts_per_tok (top-k)={top_k} is larger than the {count} experts of layer {index}; "
                "fix the model's config.json"
            )


def _read_plan(args) -> dict[int, list[int]] | None:
    """The explicit plan of ``--keep`` (JSON text) or ``--plan`` (a JSON file); None for one-shot from data."""
    if args.keep is None and args.plan is None:
        return None
    source = f"--keep {args.keep!r}" if args.keep is not None else f"--plan {args.plan!r}"
    if args.plan is not None:
        if not Path(args.plan).is_file():
            raise SystemExit(f"{source}: no such file")
        text = Path(args.plan).read_text()
    else:
        text = args.keep
    return parse_keep(text, "--keep" if args.plan is None else f"--plan {args.plan}")


def _calibration_batches(args, tokenizer) -> tuple[list[dict], dict]:
    """Calibration batches of ``--data`` and their description for the output's provenance."""
    import torch

    from hf_moeprune.data import (
        calibration_blocks,
        calibration_samples,
        load_calibration_texts,
        pack_token_ids,
        pad_batches,
    )

    texts, chat = load_calibration_texts(args.data, tokenizer, args.text_field, args.messages_field)
    if args.calibration == "packed":
        if chat:
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            blocks = torch.tensor(pack_token_ids(ids, tokenizer.eos_token_id, args.block_size)[: args.max_blocks])
            if blocks.numel() == 0:
                raise ValueError(f"{args.data} holds fewer than block_size={args.block_size} tokens")
        else:
            blocks = calibration_blocks(args.data, tokenizer, args.text_field, args.block_size, args.max_blocks)
        batches = [{"input_ids": blocks[i : i + args.batch_size]} for i in range(0, len(blocks), args.batch_size)]
        info = {"samples": len(blocks), "block_size": args.block_size}
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        samples = calibration_samples(texts, tokenizer, args.max_length, args.max_blocks)
        batches = pad_batches(samples, args.batch_size, pad or 0)
        info = {"samples": len(samples), "max_length": args.max_length, "longest_sample": max(map(len, samples))}
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return batches, {"data": args.data, "calibration": args.calibration, "chat_template": chat, "tokens": tokens,
                     **info}  # fmt: skip


def main(argv: Sequence[str]) -> int:
    import functools
    import json

    from transformers import AutoTokenizer

    from hf_moeprune.commands._parsing import parse_args, positionals_to_flags
    from hf_moeprune.loading import load_model, save_processor
    from hf_moeprune.streaming import StreamingUnsupported
    from hf_moeprune.surgery import prune_experts
    from hf_moeprune.utils import atomic_output_dir, check_output_folder

    argv = positionals_to_flags(argv, ("--model",))
    (args,) = parse_args((PruneCLIArguments,), argv, prog="hf-moeprune prune")
    check_output_folder(args.output_dir, args.overwrite)  # before the model is read
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data!r} does not exist")
    keep = _read_plan(args)
    from hf_moeprune.streaming import meta_skeleton

    # the input's tokenizer, image processor etc., so that `generate`, `push` and the processor's users work on the
    # output as on the input
    save_source_processor = functools.partial(save_processor, args.model)

    planner = meta_skeleton(args.model)  # no weights: the config's layout, checked before any calibration or write
    check_top_k_fits(planner)
    model = merge = None
    provenance: dict = {}
    if keep is None:
        from hf_moeprune.oneshot import (
            ExpertOutputObserver,
            MaxActivationObserver,
            collect_statistics,
            collect_statistics_layerwise,
            load_statistics,
            plan_oneshot,
            save_statistics,
            super_experts,
        )
        from hf_moeprune.streaming import meta_skeleton

        if args.stats_in is not None:
            stats, extra, provenance = load_statistics(args.stats_in)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            batches, provenance = _calibration_batches(args, tokenizer)
            observers = [MaxActivationObserver()] + ([ExpertOutputObserver()] if args.merge else [])
            stats = None
            if args.layerwise and args.criterion != "saliency":
                try:
                    planner, stats = collect_statistics_layerwise(args.model, batches, args.device, observers=observers)
                except StreamingUnsupported as exc:
                    logger.warning("calibrating the whole loaded model instead of layer by layer: %s", exc)
            elif args.layerwise:
                logger.warning("calibrating the whole loaded model: saliency needs gradients through the full model")
            if stats is None:
                model = planner = load_model(args.model)
                check_top_k_fits(model)
                stats = collect_statistics(model, batches, saliency=args.criterion == "saliency", observers=observers)
            extra = {name: values for o in observers for name, values in o.values.items()}
            if args.stats_out is not None:
                save_statistics(args.stats_out, stats, observers, {"model": args.model, **provenance})
                logger.info("saved expert statistics to %s", args.stats_out)
        protect = None
        if args.protect_super_experts:
            if "max_activation" not in extra:
                raise SystemExit(f"--protect_super_experts: statistics from {args.stats_in} lack max_activation")
            protect = super_experts(extra["max_activation"], args.super_expert_quantile, args.super_expert_ratio)
            logger.info(
                "super experts (never removed): %s",
                {k: v.nonzero().flatten().tolist() for k, v in protect.items() if v.any()},
            )
        keep = plan_oneshot(planner, stats, args.criterion, args.target, args.allocation,
                            min_experts=args.min_experts, multiple_of=args.multiple_of, protect=protect)  # fmt: skip
        if args.merge:
            from hf_moeprune.pruning.merging import merge_assignment

            if "output_sum" not in extra:
                raise SystemExit(
                    f"--merge: statistics from {args.stats_in} lack expert outputs; save them with --merge"
                )
            merge = {layer: (merge_assignment(extra["output_sum"][layer], kept), stats[layer].tokens)
                     for layer, kept in keep.items()}  # fmt: skip
        provenance = {"moeprune_calibration": {**provenance, "criterion": args.criterion, "target": args.target,
                                               "allocation": args.allocation, "merge": args.merge,
                                               "protect_super_experts": args.protect_super_experts}}  # fmt: skip
    if keep and args.streaming and model is None:
        from hf_moeprune.streaming import prune_checkpoint

        try:
            skeleton = prune_checkpoint(args.model, keep, args.output_dir, args.export_stock, args.max_shard_size,
                                        merge=merge, extra_config=provenance, on_written=save_source_processor,
                                        overwrite=args.overwrite,
                                        drop_group_limited_routing=args.drop_group_limited_routing)  # fmt: skip
        except StreamingUnsupported as exc:
            logger.warning("loading the whole model instead of streaming: %s", exc)
        else:
            counts = skeleton.config.experts_per_layer
            logger.info("saved pruned model to %s (experts per layer %s)", args.output_dir, counts)
            print(json.dumps({"output_dir": args.output_dir, "experts_per_layer": counts}))
            return 0
    if model is None:
        model = load_model(args.model)
        check_top_k_fits(model)
    if merge:
        from hf_moeprune.pruning.merging import merge_experts

        merge_experts(model, {layer: m[0] for layer, m in merge.items()}, {layer: m[1] for layer, m in merge.items()})
    if keep:
        prune_experts(model, keep, drop_group_limited_routing=args.drop_group_limited_routing)
    else:
        logger.warning("nothing to remove: the model keeps all its experts")
    for name, value in provenance.items():
        setattr(model.config, name, value)
    counts = getattr(model.config, "experts_per_layer", None)
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp, export_stock=args.export_stock)  # generation_config.json comes along
        save_source_processor(tmp)
    logger.info("saved pruned model to %s (experts per layer %s)", args.output_dir, counts)
    print(json.dumps({"output_dir": args.output_dir, "experts_per_layer": counts}))
    return 0
