"""The pipeline of ``hf-moeprune demo``: the whole mission on the built-in default, on a CPU, in minutes.

1. fine-tune the demo MoE on the prose domain while pruning experts (MoEPruneTrainer);
2. reorder experts for expert parallelism (ep_size 2) from loads measured on held-out prose;
3. distill the unpruned model into the pruned one (done before quantization: packed weights are frozen);
4. quantize every expert and attention weight;
5. write the model card;
6. push to a loopback stand-in for the Hub with the real huggingface_hub client;
7. reload what arrived with ``AutoModelForCausalLM.from_pretrained``;
8. generate for a batch of prompts.
Each stage's held-out losses (prose = target, code = forgetting), size and time go into a summary table
and ``demo_summary.json``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the demo writes (must be new or empty)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir once the demo succeeds."})
    finetune_steps: int = field(default=60, metadata={"help": "MoEPruneTrainer steps on the prose domain."})
    prune_target: float = field(default=0.5, metadata={"help": "Fraction of routed experts to remove."})
    prune_criterion: str = field(default="reap", metadata={"help": "Expert importance criterion."})
    ep_size: int = field(default=2, metadata={"help": "Expert-parallel size to place experts for."})
    distill_steps: int = field(default=24, metadata={"help": "Distillation steps (0 skips the stage)."})
    quant_scheme: str = field(default="int8", metadata={"help": "int8, nf4 or int4."})
    batch_size: int = field(default=16, metadata={"help": "Training batch (blocks of 128 tokens)."})
    eval_blocks: int = field(default=64, metadata={"help": "Held-out blocks per domain for the losses."})
    num_prompts: int = field(default=8, metadata={"help": "Prompts generated for at the end."})
    max_new_tokens: int = field(default=32, metadata={"help": "New tokens per prompt."})
    repo_id: str = field(default="demo/mixtral-stdlib-pruned", metadata={"help": "Repo id on the Hub stand-in."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage."})

    def __post_init__(self):
        for name in ("finetune_steps", "ep_size", "batch_size", "eval_blocks", "num_prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps={self.distill_steps} must be >= 0")
        if not 0 <= self.prune_target < 1:
            raise ValueError(f"prune_target={self.prune_target} must be in [0, 1)")


@torch.no_grad()
def held_out_loss(model, blocks, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over packed blocks (every block has the same length)."""
    model.eval()
    ids = torch.tensor(blocks["input_ids"])
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * tokens
        count += tokens
    return total / max(count, 1)


def domain_blocks(corpus, tokenizer, eval_blocks: int, block_size: int = 128):
    """Packed prose (train + validation) and the held-out blocks per domain: prose = target, code = forgetting."""
    from datasets import DatasetDict

    from hf_moeprune.data import tokenize_and_pack

    prose = tokenize_and_pack(corpus.prose, tokenizer, block_size)
    code = tokenize_and_pack(DatasetDict(validation=corpus.code["validation"]), tokenizer, block_size)
    held_out = {
        domain: blocks["validation"].select(range(min(eval_blocks, len(blocks["validation"]))))
        for domain, blocks in (("prose", prose), ("code", code))
    }
    return prose, held_out


def _routed_experts(model) -> int:
    from hf_moeprune.adapters import get_adapter

    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    return sum(adapter.num_experts(layers[i]) for i in adapter.moe_layer_indices(model))


class _Stages:
    def __init__(self, held_out: dict, eval_batch: int):
        self.rows: list[dict] = []
        self.held_out = held_out
        self.eval_batch = eval_batch

    def record(self, name: str, model, seconds: float, **extra) -> dict:
        from hf_moeprune.quantization import model_size_bytes

        losses = {domain: held_out_loss(model, blocks, self.eval_batch) for domain, blocks in self.held_out.items()}
        row = {
            "stage": name,
            "routed_experts": _routed_experts(model),
            "bytes": model_size_bytes(model),
            "prose_loss": losses["prose"],
            "code_loss": losses["code"],
            "seconds": round(seconds, 1),
            **extra,
        }
        self.rows.append(row)
        logger.info("demo stage %s: %s", name, row)
        return row


def run_demo(args: DemoArguments, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_moeprune
    from hf_moeprune.balancing.loads import measure_expert_loads, rebalance_for_expert_parallel
    from hf_moeprune.demo import build_corpus, load_or_train_base_model
    from hf_moeprune.demo.loopback_hub import LoopbackHub
    from hf_moeprune.distillation import MoEDistillArguments, MoEDistillTrainer
    from hf_moeprune.hub import CardInfo, DistillationInfo, EvalFigure, QuantizationInfo, push_to_hub, write_model_card
    from hf_moeprune.inference import generate
    from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer

    started = time.perf_counter()
    t = time.perf_counter()
    base_dir = load_or_train_base_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    corpus = build_corpus()
    prose, held_out = domain_blocks(corpus, tokenizer, args.eval_blocks)
    stages = _Stages(held_out, args.batch_size)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    stages.record("base model", base, time.perf_counter() - t)

    common = dict(
        per_device_train_batch_size=args.batch_size,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    # 1. fine-tune on prose while pruning
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    prune_args = MoEPruneArguments(
        output_dir=str(work / "finetune"),
        max_steps=args.finetune_steps,
        learning_rate=1e-3,
        warmup_steps=5,
        prune_criterion=args.prune_criterion,
        prune_target=args.prune_target,
        prune_schedule="gradual",
        prune_start_step=max(1, args.finetune_steps // 10),
        prune_end_step=max(2, args.finetune_steps // 2),
        prune_multiple_of=args.ep_size,
        **common,
    )
    trainer = MoEPruneTrainer(model=model, args=prune_args, train_dataset=prose["train"], processing_class=tokenizer)
    trainer.train()
    model = trainer.model
    stages.record("fine-tuned + pruned", model, time.perf_counter() - t)
    report_dir = Path(prune_args.output_dir)

    # 2. rebalance for expert parallelism
    t = time.perf_counter()
    ids = torch.tensor(held_out["prose"]["input_ids"])
    loads = measure_expert_loads(model, [{"input_ids": ids[i : i + 16]} for i in range(0, len(ids), 16)])
    plan = rebalance_for_expert_parallel(model, loads, args.ep_size)
    summary = plan.summary()
    stages.record(
        f"rebalanced (ep={args.ep_size})", model, time.perf_counter() - t,
        balancedness=f"{summary['mean_balancedness_before']:.3f} -> {summary['mean_balancedness_after']:.3f}",
    )  # fmt: skip

    # 3. distill from the unpruned model
    distill_info = None
    if args.distill_steps:
        t = time.perf_counter()
        distill_args = MoEDistillArguments(
            output_dir=str(work / "distill"), max_steps=args.distill_steps, learning_rate=5e-4, alpha=0.5,
            temperature=2.0, **common,
        )  # fmt: skip
        distiller = MoEDistillTrainer(
            model=model, args=distill_args, train_dataset=prose["train"], processing_class=tokenizer,
            teacher_model=base,
        )  # fmt: skip
        distiller.train()
        model = distiller.model
        stages.record("distilled", model, time.perf_counter() - t)
        distill_info = DistillationInfo(
            teacher="demo base model (unpruned)", loss="a*CE + (1-a)*T^2*KL", temperature=2.0, alpha=0.5,
            steps=args.distill_steps, dataset="Python stdlib docstrings (prose)",
        )  # fmt: skip

    # 4. quantize
    t = time.perf_counter()
    fp_bytes = stages.rows[-1]["bytes"]
    hf_moeprune.quantize(model, args.quant_scheme)
    row = stages.record(f"quantized ({args.quant_scheme})", model, time.perf_counter() - t)
    final_dir = work / "model"
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    shutil.copy(report_dir / "pruning_report.json", final_dir / "pruning_report.json")
    shutil.copy(report_dir / "expert_usage.png", final_dir / "expert_usage.png")

    # 5. model card
    first = stages.rows[0]
    card = CardInfo(
        model_name="Demo Mixtral pruned on Python stdlib prose",
        method=f"hf_moeprune dynamic pruning during fine-tuning (LAEP allocation, gradual schedule, "
        f"{args.finetune_steps} steps)",
        criterion=args.prune_criterion,
        quantization=QuantizationInfo(
            method=f"hf_moeprune {args.quant_scheme} (experts + attention)",
            bits=8 if args.quant_scheme == "int8" else 4,
            modules="experts + attention",
            size_mb_before=round(fp_bytes / 1e6, 3),
            size_mb_after=round(row["bytes"] / 1e6, 3),
        ),
        distillation=distill_info,
        evaluation=[
            EvalFigure(
                "prose held-out loss", round(row["prose_loss"], 4), "stdlib docstrings", round(first["prose_loss"], 4)
            ),
            EvalFigure("code held-out loss", round(row["code_loss"], 4), "stdlib source", round(first["code_loss"], 4)),
        ],
        tags=["demo"],
    )
    write_model_card(final_dir, card, repo_id=args.repo_id)

    # 6. push to a loopback Hub stand-in, 7. reload what arrived
    t = time.perf_counter()
    with LoopbackHub() as hub:
        url = push_to_hub(final_dir, args.repo_id, private=True, token="demo-token", endpoint=hub.url)
        arrived = work / "from_hub"
        hub.download(args.repo_id, arrived)
    files = sorted(p.name for p in arrived.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(arrived)
    same = torch.equal(
        reloaded(input_ids=ids[:2]).logits, model(input_ids=ids[:2]).logits
    )  # a quantized model reloads bit-identically
    stages.record("pushed + reloaded", reloaded, time.perf_counter() - t, files=len(files), identical_logits=same)

    # 8. generate
    t = time.perf_counter()
    texts = [row["text"] for row in corpus.prose["validation"].select(range(args.num_prompts))]
    prompts = [" ".join(text.split()[:8]) for text in texts]
    completions = generate(reloaded, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    generated = sum(c.tokens for c in completions)
    elapsed = time.perf_counter() - t
    return {
        "arguments": asdict(args),
        "stages": stages.rows,
        "hub": {"url": url, "files": files},
        "generation": {
            "prompts": len(prompts),
            "tokens": generated,
            "seconds": round(elapsed, 2),
            "tokens_per_s": round(generated / elapsed, 1),
            "samples": [{"prompt": p, "completion": c.completion} for p, c in zip(prompts[:3], completions[:3])],
        },
        "experts_per_layer": reloaded.config.experts_per_layer
        if hasattr(reloaded.config, "experts_per_layer")
        else None,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
