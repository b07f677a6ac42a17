"""Knowledge distillation from the unpruned teacher into the pruned student.

The loss is Hinton et al.'s logit distillation on the causal-LM prediction positions,

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

optionally plus ``hidden_weight`` times an MSE or cosine loss between chosen hidden layers. The maths
lives in pure functions (``distillation_loss``, ``hidden_state_loss``) testable on plain tensors;
``MoEDistillTrainer`` only feeds them the two models' outputs and keeps Trainer's gradient-accumulation
and ``num_items_in_batch`` contract: every term is a sum over prediction positions divided by the
number of label tokens in the whole accumulated (and, with ``average_tokens_across_devices``, global)
batch, so the gradient does not depend on how the batch is split into micro-batches.

Usage (the lead's benchmark: held-out CE of the pruned student against the teacher's)::

    trainer = MoEDistillTrainer(model=pruned, teacher_model=original, args=MoEDistillArguments(...),
                                train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()       # eval_ce (student), eval_teacher_ce, eval_kl
    trainer.train()
    after = trainer.evaluate()
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Trainer, TrainingArguments

from hf_moeprune import compat
from hf_moeprune.loading import load_model
from hf_moeprune.utils import fault_point, without_secrets

logger = logging.getLogger(__name__)
compat.check_trainer_overrides()  # _save_checkpoint, _load_from_checkpoint, _save below override private methods

IGNORE_INDEX = -100
PROJECTOR_FILE = "distill_projector.safetensors"  # checkpointed learned hidden-state projection


# ---------------------------------------------------------------------------------------------------
# Loss maths (pure functions)
# ---------------------------------------------------------------------------------------------------


class DistillationLoss(NamedTuple):
    """``loss`` carries the graph; ``ce``/``kl`` are detached per-token means over this batch's targets."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    num_tokens: torch.Tensor


def causal_targets(
    labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-position targets ``[B, S]``: position ``i`` predicts ``labels[:, i + 1]``; the last predicts nothing.

    This is the shift of transformers' ``ForCausalLMLoss`` (labels padded with ``ignore_index`` on the
    right), so the count of targets equals Trainer's ``num_items_in_batch`` (``labels[..., 1:] != -100``).
    A collator that already shifted its labels passes ``shift_labels`` instead, as transformers accepts.
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("pass exactly one of labels (unshifted) or shift_labels (already shifted)")
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs (as transformers' CE does); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_distillation_weights(
    alpha: float | None, temperature: float | None, alpha_name: str = "alpha", temperature_name: str = "temperature"
) -> None:
    """The one check of the distillation loss weights, for every place that takes them (the loss, its
    TrainingArguments, the compress recipe, the model card): ``alpha`` in [0, 1], ``temperature`` a finite
    number > 0; ``None`` is not checked (an unset optional). Errors name the field as its caller calls it."""
    for name, value in ((alpha_name, alpha), (temperature_name, temperature)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"{name}={value!r} must be a number")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{alpha_name}={alpha!r} must be in [0, 1]")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{temperature_name}={temperature!r} must be a finite number > 0")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> DistillationLoss:
    """``alpha * CE + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`` over the causal prediction positions.

    Positions whose target is ``ignore_index`` (and the last position of each row) contribute nothing.
    Both terms are summed over positions and divided by ``num_items_in_batch`` when given (the token
    count of the whole accumulated batch, as Trainer passes it), else by this batch's target count.
    The T^2 factor keeps the soft-target gradients' scale independent of T (Hinton et al. 2015).
    Half-precision logits are upcast to float32, like transformers' CE.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "the two models must share the vocabulary and see the same inputs"
        )
    check_distillation_weights(alpha, temperature)
    targets = causal_targets(labels, shift_labels, ignore_index).to(student_logits.device)
    mask = targets != ignore_index
    # Only the target positions are materialised in float32: for a large vocabulary the full [B, S, V]
    # float32 copies would dominate memory.
    student = _upcast(student_logits[mask])
    teacher = _upcast(teacher_logits.to(student_logits.device)[mask]).to(student.dtype)
    num_tokens = mask.sum()
    ce_sum = F.cross_entropy(student, targets[mask], reduction="sum")
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl_sum = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp_min(1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(ce_sum.device)
    loss = (alpha * ce_sum + (1.0 - alpha) * temperature**2 * kl_sum) / denominator
    per_token = num_tokens.clamp_min(1)
    return DistillationLoss(loss, (ce_sum / per_token).detach(), (kl_sum / per_token).detach(), num_tokens)


def _mse_per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).mean(-1)


def _cosine_per_token(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1)


def _param_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    param = next(module.parameters(), None)
    return x.dtype if param is None else param.dtype


# name -> per-token loss [N, H] x [N, H] -> [N]
HIDDEN_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse_per_token,
    "cosine": _cosine_per_token,
}


def get_hidden_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_loss={name!r} is not known; known: {sorted(HIDDEN_LOSSES)}")
    return HIDDEN_LOSSES[name]


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor,
    kind: str = "mse",
    projections: Sequence[nn.Module] | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over layer pairs of the per-token ``kind`` loss between ``projection(student)`` and ``teacher``.

    ``mask`` [B, S] selects the positions (the trainer passes the causal prediction positions, so the
    normalisation matches ``distillation_loss``). Returns ``(loss, detached per-token mean)``; ``loss``
    is a sum over positions divided by ``num_items_in_batch`` when given, else by the mask count.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need matching, non-empty layer lists; got {len(student_hidden)} and {len(teacher_hidden)}")
    per_token = get_hidden_loss(kind)
    projections = projections if projections is not None else [nn.Identity()] * len(student_hidden)
    total = None
    for s, t, proj in zip(student_hidden, teacher_hidden, projections):
        s = proj(_upcast(s[mask]).to(_param_dtype(proj, s)))
        t = _upcast(t.to(s.device)[mask]).to(s.dtype)
        if s.shape != t.shape:
            raise ValueError(
                f"student hidden states {tuple(s.shape)} and teacher hidden states {tuple(t.shape)} differ after "
                "projection; use a learned projection (hidden_projection='auto' or 'linear')"
            )
        term = per_token(s, t).sum()
        total = term if total is None else total + term
    total = total / len(student_hidden)
    num_tokens = mask.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp_min(1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator, (total / num_tokens.clamp_min(1)).detach()


# ---------------------------------------------------------------------------------------------------
# Vocabulary check
# ---------------------------------------------------------------------------------------------------


class VocabularyMismatchError(ValueError):
    """Student and teacher do not share a vocabulary, so their logits cannot be compared."""


def _vocab_size(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def check_same_vocabulary(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Raise ``VocabularyMismatchError`` naming both sizes when student and teacher vocabularies differ.

    ``student``/``teacher`` are models or configs (``config.vocab_size`` is compared). When tokenizers
    are given, their sizes and token -> id maps are compared too, and each must fit its model.
    """
    s_size, t_size = _vocab_size(student), _vocab_size(teacher)
    if s_size != t_size:
        raise VocabularyMismatchError(
            f"student vocab_size={s_size} but teacher vocab_size={t_size}; distillation compares logits token by "
            "token, so the teacher must be the unpruned model or a checkpoint with the same vocabulary"
        )
    for who, tok, size in (("student", student_tokenizer, s_size), ("teacher", teacher_tokenizer, t_size)):
        if tok is not None and len(tok) > size:
            raise VocabularyMismatchError(
                f"{who} tokenizer has {len(tok)} tokens but the {who} model's vocab_size is {size}"
            )
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    s_len, t_len = len(student_tokenizer), len(teacher_tokenizer)
    if s_len != t_len:
        raise VocabularyMismatchError(
            f"student tokenizer has {s_len} tokens but teacher tokenizer has {t_len}; they must be the same vocabulary"
        )
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    differ = sorted(tok for tok in s_vocab if t_vocab.get(tok) != s_vocab[tok])
    if differ:
        example = differ[0]
        raise VocabularyMismatchError(
            f"student and teacher tokenizers both have {s_len} tokens but {len(differ)} map to different ids "
            f"(e.g. {example!r}: student {s_vocab[example]}, teacher {t_vocab.get(example)})"
        )


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------

HIDDEN_PROJECTIONS = ("auto", "linear", "none")
TEACHER_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class MoEDistillArguments(TrainingArguments):
    """TrainingArguments plus the distillation fields; every other field is Trainer's own."""

    alpha: float = field(
        default=0.5, metadata={"help": "weight of the hard-label CE; the KL to the teacher gets 1 - alpha (in [0, 1])"}
    )
    temperature: float = field(
        default=2.0, metadata={"help": "softmax temperature T for the KL term (> 0); the KL is scaled by T^2"}
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "weight of the hidden-state loss (>= 0); 0 turns it off"}
    )
    hidden_loss: str = field(default="mse", metadata={"help": f"hidden-state loss, one of {sorted(HIDDEN_LOSSES)}"})
    hidden_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={
            "help": "student hidden_states indices to match (0 = embeddings, i = after decoder layer i, -1 = last)"
        },
    )
    teacher_hidden_layers: list[int] | None = field(
        default=None,
        metadata={"help": "teacher hidden_states indices paired with hidden_layers (default: the same indices)"},
    )
    hidden_projection: str = field(
        default="auto",
        metadata={
            "help": "student->teacher hidden projection: 'auto' (learned linear only when hidden sizes differ, "
            "identity otherwise), 'linear' (always learned, identity-initialised when sizes match), 'none'"
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": f"dtype for a teacher loaded from a path or Hub id, one of {sorted(TEACHER_DTYPES)}"},
    )
    use_lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters on the student instead of all weights"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (> 0)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (> 0)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout in [0, 1)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "nn.Linear modules for LoRA ('all-linear' = every linear layer except the LM head)"},
    )
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "3D fused-expert parameters for LoRA (peft target_parameters), e.g. mlp.experts.gate_up_proj; "
            "default: the student family's expert weights; pass an empty list for none"
        },
    )
    merge_lora: bool = field(
        default=True,
        metadata={"help": "merge the LoRA adapters into the student at the end of train(), giving a plain model"},
    )

    def __post_init__(self):
        super().__post_init__()
        check_distillation_weights(self.alpha, self.temperature)
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            raise ValueError(f"hidden_weight={self.hidden_weight!r} must be a finite number >= 0")
        get_hidden_loss(self.hidden_loss)
        if self.hidden_projection not in HIDDEN_PROJECTIONS:
            raise ValueError(f"hidden_projection={self.hidden_projection!r} is not one of {list(HIDDEN_PROJECTIONS)}")
        if not self.hidden_layers:
            raise ValueError("hidden_layers=[] must list at least one hidden_states index")
        if self.teacher_hidden_layers is not None and len(self.teacher_hidden_layers) != len(self.hidden_layers):
            raise ValueError(
                f"teacher_hidden_layers={self.teacher_hidden_layers} must pair one-to-one with "
                f"hidden_layers={self.hidden_layers}"
            )
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r} is not one of {sorted(TEACHER_DTYPES)}")
        if self.lora_r <= 0:
            raise ValueError(f"lora_r={self.lora_r!r} must be > 0")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")

    def lora_config(self, student: nn.Module):
        """The ``peft.LoraConfig`` these fields describe for ``student``."""
        from peft import LoraConfig

        targets = self.lora_target_modules
        target_modules = "all-linear" if targets == ["all-linear"] else list(targets)
        parameters = self.lora_target_parameters
        if parameters is None:
            parameters = default_expert_lora_parameters(student)
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=target_modules,
            target_parameters=list(parameters) or None,
            task_type="CAUSAL_LM",
        )


def default_expert_lora_parameters(model: nn.Module) -> list[str]:
    """The fused expert weight matrices (3D, expert on dim 0) of ``model``'s MoE family, e.g.
    ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``; biases are left out. Empty for an
    architecture hf_moeprune has no adapter for."""
    from hf_moeprune.adapters import get_adapter

    try:
        adapter = get_adapter(model)
    except ValueError:
        return []
    layers = adapter.decoder_layers(model)
    names = []
    for dotted in adapter.tensor_names:
        if not dotted.startswith(f"{adapter.experts_path}."):
            continue
        for idx in adapter.moe_layer_indices(model):
            try:
                tensor = layers[idx].get_parameter(dotted)
            except AttributeError:
                continue
            if tensor.dim() == 3:
                names.append(dotted)
            break
    return names


# ---------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional
        return False
    return isinstance(model, PeftModel)


def _movable(model: nn.Module) -> bool:
    """Whether ``.to(device)`` is right for the teacher: not when a device_map spreads it or it is quantized."""
    device_map = getattr(model, "hf_device_map", None)
    spread = bool(device_map) and len(set(device_map.values())) > 1
    return not spread and not getattr(model, "is_quantized", False)


class MoEDistillTrainer(Trainer):
    """Trainer that distils ``teacher_model`` into ``model`` (the pruned student).

    The parent signature is kept; the additions are keyword-only: ``teacher_model`` (a model or a path/Hub
    id, loaded with the Auto class of its family by ``hf_moeprune.loading.load_model``),
    ``teacher_processing_class`` (checked against ``processing_class`` for a shared vocabulary) and
    ``peft_config`` (LoRA on the student; or set ``args.use_lora``). ``model`` may also be a path.

    The teacher is frozen, kept in eval mode, moved to the student's device and never handed to
    accelerate, so DDP never wraps it. Components are logged as ``ce``, ``kl``, ``hidden``, ``aux`` (and
    ``eval_*`` plus ``eval_teacher_ce`` from ``evaluate()``).
    """

    # compute_loss normalises by num_items_in_batch itself (or divides by the accumulation steps).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        args: MoEDistillArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        *parent_args,
        teacher_model: PreTrainedModel | nn.Module | str,
        teacher_processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = MoEDistillArguments()
        if not isinstance(args, MoEDistillArguments):
            raise TypeError(f"args must be MoEDistillArguments, got {type(args).__name__}")
        if compute_loss_func is not None:
            raise ValueError("compute_loss_func is not supported: the distillation loss is computed by this trainer")
        if model_init is not None:
            raise ValueError("model_init is not supported: pass the student as model")
        if isinstance(model, (str, Path)):
            model = load_model(model)
        if model is None:
            raise ValueError("model (the student) is required")
        teacher = self._load_teacher(teacher_model, model, args)
        if teacher is model or {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
            raise ValueError("teacher_model shares parameters with the student; pass a separate copy of the teacher")
        check_same_vocabulary(model, teacher, processing_class, teacher_processing_class)

        if peft_config is not None and args.use_lora:
            raise ValueError("both peft_config and args.use_lora are set; choose one")
        if args.use_lora:
            peft_config = args.lora_config(model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()

        self.teacher = teacher
        self.hidden_projector = self._build_projector(model, teacher, args)
        self._metrics: dict[str, defaultdict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        super().__init__(
            model,
            args,
            data_collator,
            train_dataset,
            eval_dataset,
            processing_class,
            None,
            None,
            *parent_args,
            **kwargs,
        )
        # Trainer only counts num_items_in_batch for models that accept loss kwargs; this loss always uses it.
        self.model_accepts_loss_kwargs = True
        self.teacher.eval().requires_grad_(False)
        if _movable(self.teacher):
            self.teacher.to(self.args.device)
        if self.hidden_projector is not None:
            self.hidden_projector.to(self.args.device)

    # -- setup --------------------------------------------------------------------------------------
    @staticmethod
    def _load_teacher(teacher, student: nn.Module, args: MoEDistillArguments) -> nn.Module:
        if not isinstance(teacher, (str, Path)):
            if teacher is None:
                raise ValueError("teacher_model is required")
            return teacher
        # Compare vocabularies on the config before the (possibly large) teacher weights are read.
        check_same_vocabulary(student, AutoConfig.from_pretrained(str(teacher)))
        return load_model(teacher, dtype=TEACHER_DTYPES[args.teacher_dtype])

    @staticmethod
    def _build_projector(student: nn.Module, teacher: nn.Module, args: MoEDistillArguments) -> nn.ModuleList | None:
        if args.hidden_weight == 0:
            return None
        s_size = student.config.get_text_config().hidden_size
        t_size = teacher.config.get_text_config().hidden_size
        if args.hidden_projection == "none" and s_size != t_size:
            raise ValueError(
                f"hidden_projection='none' but student hidden_size={s_size} and teacher hidden_size={t_size}; "
                "use 'auto' or 'linear'"
            )
        if args.hidden_projection == "none" or (args.hidden_projection == "auto" and s_size == t_size):
            return None
        projections = []
        # Seeded from args.seed so that every rank starts from the same projection (DDP only
        # broadcasts the student's own parameters).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            for _ in args.hidden_layers:
                proj = nn.Linear(s_size, t_size, bias=False)
                if s_size == t_size:
                    nn.init.eye_(proj.weight)
                projections.append(proj)
        return nn.ModuleList(projections)

    def create_optimizer(self, model=None):
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if self.hidden_projector is not None:
            if created_here:
                optimizer.add_param_group({"params": list(self.hidden_projector.parameters()), "weight_decay": 0.0})
            else:
                logger.warning("a custom optimizer was given: the hidden-state projection will not be trained")
        return optimizer

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        # The learned hidden-state projection is not part of the student: it is checkpointed beside it (before
        # trainer_state.json, the file Trainer writes last, so a complete checkpoint always has it).
        if self.hidden_projector is not None and self.args.should_save:
            from safetensors.torch import save_file

            folder = Path(compat.trainer_output_dir(self, trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.hidden_projector.state_dict().items()}
            save_file(state, folder / PROJECTOR_FILE)
        super()._save_checkpoint(model, trial)
        fault_point("distill.checkpoint_saved")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.hidden_projector is not None:
            from safetensors.torch import load_file

            path = Path(resume_from_checkpoint) / PROJECTOR_FILE
            if not path.is_file():
                raise ValueError(f"checkpoint {str(resume_from_checkpoint)!r} has no {PROJECTOR_FILE} to resume from")
            self.hidden_projector.load_state_dict(load_file(str(path)))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self._saving_checkpoint = _internal_call
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Trainer pickles self.args into training_args.bin: without the Hub token, the folder may be shared
        args, self.args = self.args, without_secrets(self.args)
        try:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if not (getattr(self, "_saving_checkpoint", False) and isinstance(model, PreTrainedModel)):
                return super()._save(output_dir, state_dict)
            # Trainer resumes with a plain load_state_dict of the checkpoint file (transformers 5.24), so a
            # checkpoint keeps the in-memory parameter names: not the original-format names save_pretrained
            # converts fused experts back to by default (Mixtral's experts.N.w1...), and for a pruned student
            # not the stock export. Otherwise a resume would silently keep the freshly loaded weights.
            extra = {"save_original_format": False}
            if "export_stock" in inspect.signature(model.save_pretrained).parameters:
                extra["export_stock"] = False
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save, **extra)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        finally:
            self.args = args

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.hidden_projector is not None and self.accelerator.num_processes > 1:
            # The projection lives outside the DDP-wrapped student, so average its gradients here. Doing it
            # every micro-step is still exact: the part already averaged is identical on every rank.
            for param in self.hidden_projector.parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")
        return loss

    # -- loss ---------------------------------------------------------------------------------------
    def _teacher_outputs(self, inputs: dict[str, Any]):
        if self.teacher.training:
            # A caller flipped the teacher to train mode (e.g. model.train() on a container): dropout and
            # other train-time behaviour must stay off for the soft targets.
            self.teacher.eval()
        # no_grad rather than inference_mode: inference tensors cannot be saved for the KL's backward.
        with torch.no_grad():
            return self.teacher(**inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: MoEDistillArguments = self.args
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        if labels is None and shift_labels is None:
            raise ValueError(f"distillation needs labels in the batch; got keys {sorted(inputs)}")
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model_inputs["use_cache"] = False
        use_hidden = args.hidden_weight > 0
        if use_hidden:
            model_inputs["output_hidden_states"] = True
        outputs = model(**model_inputs)
        teacher_outputs = self._teacher_outputs(model_inputs)

        training = model.training
        scale_for_ga = 1.0
        if num_items_in_batch is None:
            # Called outside Trainer's loop: per-batch mean, split over the accumulation steps.
            ga = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
            scale_for_ga = 1.0 / ga if training else 1.0
        targets = causal_targets(labels, shift_labels).to(outputs.logits.device)
        kd = distillation_loss(
            outputs.logits,
            teacher_outputs.logits,
            None,
            args.alpha,
            args.temperature,
            shift_labels=targets,
            num_items_in_batch=num_items_in_batch,
        )
        token_loss = kd.loss
        hidden_value = None
        if use_hidden:
            s_layers = [outputs.hidden_states[i] for i in args.hidden_layers]
            t_idx = args.teacher_hidden_layers if args.teacher_hidden_layers is not None else args.hidden_layers
            t_layers = [teacher_outputs.hidden_states[i] for i in t_idx]
            hidden, hidden_value = hidden_state_loss(
                s_layers,
                t_layers,
                targets != IGNORE_INDEX,
                args.hidden_loss,
                self.hidden_projector,
                num_items_in_batch,
            )
            token_loss = token_loss + args.hidden_weight * hidden
        if num_items_in_batch is not None and args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens while DDP averages gradients; mirror Trainer.
            token_loss = token_loss * (
                self.accelerator.num_processes // self.get_tp_size() if args.n_gpu <= 1 else args.n_gpu
            )
        loss = token_loss * scale_for_ga
        aux = getattr(outputs, "aux_loss", None)
        coef = getattr(self.accelerator.unwrap_model(model), "router_aux_loss_coef", 0.0) or 0.0
        if aux is not None and coef:
            # A per-micro-batch mean, so it is split over the accumulation steps like a mean loss.
            ga = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
            loss = loss + coef * aux.to(loss.device) / (ga if training else 1)

        self._record(training, kd, hidden_value, aux, targets, teacher_outputs.logits if not training else None)
        return (loss, outputs) if return_outputs else loss

    # -- logging ------------------------------------------------------------------------------------
    def _record(self, training, kd: DistillationLoss, hidden, aux, targets, teacher_logits) -> None:
        n = kd.num_tokens.float()
        stats = {"ce": kd.ce * n, "kl": kd.kl * n}
        if hidden is not None:
            stats["hidden"] = hidden * n
        if teacher_logits is not None:
            mask = targets != IGNORE_INDEX
            stats["teacher_ce"] = F.cross_entropy(
                teacher_logits.to(targets.device)[mask].float(), targets[mask], reduction="sum"
            )
        names = list(stats)
        values = torch.stack([stats[k].detach().float().reshape(()) for k in names] + [n])
        if aux is not None:
            names.append("aux")
            values = torch.cat([values, aux.detach().float().reshape(1).to(values.device)])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        values = values.tolist()
        store = self._metrics["train" if training else "eval"]
        for name, value in zip(names[: len(stats)], values[: len(stats)]):
            store[name] += value
        store["_tokens"] += values[len(stats)]
        if aux is not None:
            store["aux"] += values[-1] / self.accelerator.num_processes
            store["_steps"] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        store = self._metrics[mode]
        tokens, steps = store.pop("_tokens", 0.0), store.pop("_steps", 0.0)
        prefix = "eval_" if mode == "eval" else ""
        # In place: evaluate() returns this same dict, so the components reach its caller too.
        for name, total in store.items():
            denominator = steps if name == "aux" else tokens
            if denominator:
                logs[f"{prefix}{name}"] = total / denominator
        store.clear()
        super().log(logs, start_time)

    # -- LoRA ---------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.merge_lora and _is_peft_model(self.accelerator.unwrap_model(self.model)):
            self.merge_adapters()
        return output

    def merge_adapters(self) -> nn.Module:
        """Fold the student's LoRA adapters into its weights and make the plain model the trained one.

        After this ``save_model`` writes an ordinary checkpoint (for a pruned student: hf_moeprune's
        pruned format), loadable with ``from_pretrained`` without peft.
        """
        peft_model = self.accelerator.unwrap_model(self.model)
        if not _is_peft_model(peft_model):
            raise ValueError(f"the student is a {type(peft_model).__name__}, not a peft model; nothing to merge")
        merged = peft_model.merge_and_unload()
        merged.requires_grad_(True)
        self.model = self.model_wrapped = merged
        logger.info("merged LoRA adapters into the student (%s)", type(merged).__name__)
        return merged
