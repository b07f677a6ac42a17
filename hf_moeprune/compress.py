"""Compression chain of ``hf-moeprune compress RECIPE.yaml``: distill -> quantize -> model card -> push, each step
optional.

Distillation runs before quantization: quantized weights are packed and frozen, so the student is trained in
full precision first. Every input is checked before any model is loaded: an unknown scheme, a teacher without
data, or a push without a token fails at once and writes nothing; the output folder appears only when every
step before the push succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class CompressArguments:
    model: str = field(metadata={"help": "The pruned model (folder or Hub id) to compress."})
    output_dir: str = field(metadata={"help": "Where the compressed model goes (must be new or empty)."})
    teacher: str | None = field(default=None, metadata={"help": "Unpruned teacher; set it to distill (needs data)."})
    data: str | None = field(default=None, metadata={"help": "Distillation text (saved dataset, .jsonl, text)."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per distillation block."})
    distill_steps: int = field(default=100, metadata={"help": "Distillation optimizer steps."})
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the hard-label CE (KL gets 1 - alpha)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the KL."})
    distill_learning_rate: float = field(default=5e-4, metadata={"help": "Distillation learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Distillation blocks per step."})
    quant_scheme: str | None = field(default="int8", metadata={"help": "int8, nf4, int4, or none to skip."})
    quant_format: str = field(
        default="auto",
        metadata={
            "help": "auto (compressed-tensors when the layout allows, else hf_moeprune), compressed-tensors "
            "(vLLM, SGLang, stock transformers) or hf_moeprune (any layout, also nf4)."
        },
    )
    include_lm_head: bool = field(default=False, metadata={"help": "Quantize the LM head too."})
    card: bool = field(default=True, metadata={"help": "Write README.md (model card) into the output."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the original model, for the card."})
    push_repo_id: str | None = field(default=None, metadata={"help": "Push the result to this Hub repo (or skip)."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the token file)."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub endpoint (default: HF_ENDPOINT)."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir once the new one is complete."}
    )

    def __post_init__(self):
        if self.quant_scheme is not None and self.quant_scheme.lower() == "none":
            self.quant_scheme = None
        if self.quant_scheme is not None:
            from hf_moeprune.quantization.schemes import get_scheme

            get_scheme(self.quant_scheme)
            from hf_moeprune.quantization.save import check_format

            check_format(self.quant_format, self.quant_scheme, name="quant_format")
        if self.teacher is not None and self.data is None:
            raise ValueError(f"teacher={self.teacher!r} is set but no data to distill on: set data")
        for name in ("block_size", "distill_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        from hf_moeprune.distillation import check_distillation_weights

        check_distillation_weights(self.distill_alpha, self.distill_temperature, "distill_alpha", "distill_temperature")


def compress(args: CompressArguments) -> dict:
    """Run the chain; returns a summary (sizes, what ran, where it was pushed)."""
    import torch
    from transformers import AutoTokenizer

    from hf_moeprune.hub import (
        CardInfo,
        DistillationInfo,
        push_to_hub,
        quantization_from_config,
        resolve_token,
    )
    from hf_moeprune.loading import load_model, save_processor
    from hf_moeprune.quantization import model_size_bytes, weight_files_size_bytes
    from hf_moeprune.quantization.save import save_quantized
    from hf_moeprune.utils import atomic_output_dir, check_output_folder

    check_output_folder(args.output_dir, args.overwrite)
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"data={args.data!r} does not exist")
    token = None
    if args.push_repo_id:  # everything the push needs is checked before any work
        from huggingface_hub import constants

        from hf_moeprune.hub import _check_repo_id

        _check_repo_id(args.push_repo_id)
        token = resolve_token(args.token)
        if constants.is_offline_mode():
            raise ValueError(
                f"push_repo_id={args.push_repo_id!r} needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1); "
                "unset it, or drop push_repo_id to compress without pushing"
            )
    if args.quant_scheme is not None and args.quant_format == "compressed-tensors":
        from hf_moeprune.quantization.save import saved_layout_problem

        problem = saved_layout_problem(args.model)
        if problem:
            raise ValueError(f"quant_format='compressed-tensors': {args.model!r} cannot be written so: {problem}")
    summary: dict = {"model": args.model, "steps": []}
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as out:
        model = load_model(args.model)
        summary["bytes_in"] = model_size_bytes(model)
        distillation = quantization = None
        if args.teacher is not None:
            from hf_moeprune.data import load_text_dataset, tokenize_and_pack
            from hf_moeprune.distillation import MoEDistillArguments, MoEDistillTrainer

            tokenizer = AutoTokenizer.from_pretrained(args.model)  # only distillation reads text
            blocks = tokenize_and_pack(load_text_dataset(args.data, args.text_field), tokenizer, args.block_size)
            with tempfile.TemporaryDirectory(prefix="hf_moeprune-distill-") as work:
                trainer = MoEDistillTrainer(
                    model=model,
                    args=MoEDistillArguments(
                        output_dir=work,
                        max_steps=args.distill_steps,
                        per_device_train_batch_size=args.batch_size,
                        learning_rate=args.distill_learning_rate,
                        alpha=args.distill_alpha,
                        temperature=args.distill_temperature,
                        report_to=[],
                        save_strategy="no",
                        use_cpu=not torch.cuda.is_available(),
                    ),  # fmt: skip
                    train_dataset=blocks["train"],
                    processing_class=tokenizer,
                    teacher_model=args.teacher,
                )
                trainer.train()
                model = trainer.model
            distillation = DistillationInfo(
                teacher=args.teacher, loss="a*CE + (1-a)*T^2*KL", temperature=args.distill_temperature,
                alpha=args.distill_alpha, steps=args.distill_steps, dataset=Path(args.data).name,
            )  # fmt: skip
            summary["steps"].append("distill")
        summary["bytes_out"] = before = model_size_bytes(model)
        if args.quant_scheme is None:
            model.save_pretrained(out)
        else:
            written = save_quantized(
                model, out, args.quant_scheme, args.quant_format, include_lm_head=args.include_lm_head
            )
            summary["bytes_out"] = weight_files_size_bytes(out)
            quantization = dataclasses.replace(
                quantization_from_config(json.loads((Path(out) / "config.json").read_text())),
                size_mb_before=round(before / 1e6, 3),
                size_mb_after=round(summary["bytes_out"] / 1e6, 3),
            )
            summary["format"] = written
            summary["steps"].append(f"quantize:{args.quant_scheme}")
        save_processor(args.model, out)  # the tokenizer, and a vision-language model's image processor etc.
        if args.card:
            from hf_moeprune.hub import write_model_card

            card = CardInfo(base_model=args.base_model, quantization=quantization, distillation=distillation)
            write_model_card(out, card, repo_id=args.push_repo_id)
            summary["steps"].append("card")
        (Path(out) / "compress_summary.json").write_text(json.dumps(summary, indent=2))
    if args.push_repo_id:
        summary["url"] = push_to_hub(
            args.output_dir, args.push_repo_id, private=args.private, token=token, endpoint=args.endpoint
        )
        summary["steps"].append("push")
    return summary
