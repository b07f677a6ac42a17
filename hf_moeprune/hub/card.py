"""Model cards: the typed records a card reports, and rendering/writing the card of a model folder."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hf_moeprune.format.layout import base_model_type, expert_layout, is_pruned_config, pruned_layout
from hf_moeprune.format.safetensors_header import read_header
from hf_moeprune.hub.plots import _matplotlib_available, plot_expert_counts
from hf_moeprune.utils import atomic_output_file, atomic_write_bytes

logger = logging.getLogger(__name__)

# hf_moeprune/model_cards is a link to the repository's model_cards/ folder; wheels ship its files as package data
DEFAULT_TEMPLATE = Path(__file__).parent.parent / "model_cards" / "pruned_moe.md"
PLOT_FILENAME = "expert_counts.png"
CARD_FILENAME = "README.md"
# Placeholder shown in the loading snippets when the card is written before the repo id is known.
REPO_ID_PLACEHOLDER = "path/to/this-model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


def _require_text(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={value!r} must be a non-empty string")


def _require_optional_number(value: Any, name: str, low: float | None = None, high: float | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} must lie in [{low}, {high}]")


@dataclass
class QuantizationInfo:
    """How the published weights were quantized; sizes are measured on the saved files."""

    method: str = field(metadata={"help": "quantization scheme, e.g. 'torchao int8 weight-only' or 'bnb nf4'"})
    bits: int = field(metadata={"help": "bits per quantized weight"})
    modules: str | None = field(default=None, metadata={"help": "what was quantized, e.g. 'experts + attention'"})
    size_mb_before: float | None = field(default=None, metadata={"help": "checkpoint size before, in MB"})
    size_mb_after: float | None = field(default=None, metadata={"help": "checkpoint size after, in MB"})

    def __post_init__(self):
        _require_text(self.method, "QuantizationInfo.method")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValueError(f"QuantizationInfo.bits={self.bits!r} must be an integer in [1, 32]")
        if self.modules is not None:
            _require_text(self.modules, "QuantizationInfo.modules")
        _require_optional_number(self.size_mb_before, "QuantizationInfo.size_mb_before", low=0)
        _require_optional_number(self.size_mb_after, "QuantizationInfo.size_mb_after", low=0)

    @property
    def size_ratio(self) -> float | None:
        if self.size_mb_before and self.size_mb_after is not None:
            return self.size_mb_after / self.size_mb_before
        return None


@dataclass
class DistillationInfo:
    """Knowledge distillation that recovered quality after pruning."""

    teacher: str = field(metadata={"help": "teacher model (Hub id or description)"})
    loss: str | None = field(default=None, metadata={"help": "loss, e.g. 'a*CE + (1-a)*T^2*KL'"})
    temperature: float | None = field(default=None, metadata={"help": "softmax temperature T"})
    alpha: float | None = field(default=None, metadata={"help": "weight of the hard-label loss, in [0, 1]"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps"})
    dataset: str | None = field(default=None, metadata={"help": "distillation data"})

    def __post_init__(self):
        _require_text(self.teacher, "DistillationInfo.teacher")
        for name in ("loss", "dataset"):
            if getattr(self, name) is not None:
                _require_text(getattr(self, name), f"DistillationInfo.{name}")
        from hf_moeprune.distillation import check_distillation_weights

        check_distillation_weights(
            self.alpha, self.temperature, "DistillationInfo.alpha", "DistillationInfo.temperature"
        )
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"DistillationInfo.steps={self.steps!r} must be a positive integer")


@dataclass
class EvalFigure:
    """One measured number: this model's value and, when measured, the unpruned base model's."""

    metric: str = field(metadata={"help": "metric name, e.g. 'perplexity' or 'accuracy'"})
    value: float = field(metadata={"help": "value for this model"})
    dataset: str | None = field(default=None, metadata={"help": "evaluation data"})
    baseline: float | None = field(default=None, metadata={"help": "value for the base model, same setup"})

    def __post_init__(self):
        _require_text(self.metric, "EvalFigure.metric")
        if self.dataset is not None:
            _require_text(self.dataset, "EvalFigure.dataset")
        if self.value is None:
            raise ValueError(f"EvalFigure.value for metric {self.metric!r} is required")
        _require_optional_number(self.value, f"EvalFigure.value ({self.metric})")
        _require_optional_number(self.baseline, f"EvalFigure.baseline ({self.metric})")

    @property
    def relative_change(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return (self.value - self.baseline) / abs(self.baseline)


@dataclass
class CardInfo:
    """What the config cannot tell about a pruned model. Everything is optional; absent means "not said"."""

    base_model: str | None = field(default=None, metadata={"help": "Hub id of the model that was pruned"})
    method: str | None = field(default=None, metadata={"help": "pruning method, e.g. 'LAEP' or 'REAP one-shot'"})
    criterion: str | None = field(default=None, metadata={"help": "expert importance criterion, e.g. 'token load'"})
    license: str | None = field(default=None, metadata={"help": "license id for the card metadata, e.g. apache-2.0"})
    model_name: str | None = field(default=None, metadata={"help": "title of the card"})
    description: str | None = field(default=None, metadata={"help": "free text placed under the title"})
    tags: list[str] = field(default_factory=list, metadata={"help": "extra Hub tags"})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub ids of the data used while pruning"})
    quantization: QuantizationInfo | None = None
    distillation: DistillationInfo | None = None
    evaluation: list[EvalFigure] = field(default_factory=list)
    plot: bool = field(default=True, metadata={"help": "save a per-layer expert-count plot when matplotlib exists"})

    def __post_init__(self):
        if self.base_model is not None:
            _check_repo_id(self.base_model, "CardInfo.base_model")
        for name in ("method", "criterion", "model_name", "description"):
            if getattr(self, name) is not None:
                _require_text(getattr(self, name), f"CardInfo.{name}")
        if self.license is not None and not (isinstance(self.license, str) and _LICENSE_RE.match(self.license)):
            raise ValueError(
                f"CardInfo.license={self.license!r} must be a Hub license id such as 'apache-2.0', 'mit' or 'other'"
            )
        for name in ("tags", "datasets"):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"CardInfo.{name}={values!r} must be a list of non-empty strings")
        for name, kind in (("quantization", QuantizationInfo), ("distillation", DistillationInfo)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"CardInfo.{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        bad = [e for e in self.evaluation if not isinstance(e, EvalFigure)]
        if bad:
            raise ValueError(f"CardInfo.evaluation must hold EvalFigure records, got {bad!r}")


def _quant_method(config: dict[str, Any]) -> str | None:
    quantization = config.get("quantization_config")
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


# checkpoint kind -> the load path its card shows; each is exercised by a test on that kind of checkpoint:
# compressed_tensors: tests/test_compressed_tensors.py (stock transformers + compressed-tensors, no hf_moeprune);
# hf_moeprune_quantized: tests/test_quantization.py (loads with hf_moeprune, fails loudly without it);
# stock / pruned_format: tests/test_format.py and tests/test_hub.py (plain, and trust_remote_code without it).
CHECKPOINT_KINDS = ("compressed_tensors", "hf_moeprune_quantized", "stock", "pruned_format")


def checkpoint_kind(config: dict[str, Any]) -> str:
    method = _quant_method(config)
    if method == "compressed-tensors":
        return "compressed_tensors"
    if method == "hf_moeprune":
        return "hf_moeprune_quantized"
    if method is not None:
        raise ValueError(
            f"config.json has quantization_config.quant_method={method!r}; hf_moeprune writes cards for "
            "'compressed-tensors' and 'hf_moeprune' checkpoints only, and cannot say how to load this one"
        )
    return "pruned_format" if is_pruned_config(config) else "stock"


def _ct_scheme_text(config: dict[str, Any]) -> str | None:
    if _quant_method(config) != "compressed-tensors":
        return None
    groups = config["quantization_config"].get("config_groups") or {}
    weights = next(iter(groups.values()), {}).get("weights") or {}
    bits, strategy, group = weights.get("num_bits"), weights.get("strategy"), weights.get("group_size")
    layout = f"group size {group}" if strategy == "group" else "per output channel"
    return f"W{bits}A16, symmetric int{bits}, {layout}"


def quantization_from_config(config: dict[str, Any]) -> QuantizationInfo | None:
    """What config.json says about the quantization (sizes are left to the caller, who measured them)."""
    method = _quant_method(config)
    quantization = config.get("quantization_config")
    if method == "compressed-tensors":
        groups = quantization.get("config_groups") or {}
        bits = (next(iter(groups.values()), {}).get("weights") or {}).get("num_bits")
        return QuantizationInfo(
            method=f"compressed-tensors pack-quantized ({_ct_scheme_text(config)})",
            bits=int(bits) if bits else 8,
            modules="experts + attention" + (" + lm_head" if "lm_head" not in quantization.get("ignore", []) else ""),
        )
    if method == "hf_moeprune":
        scheme = quantization.get("scheme", "int8")
        return QuantizationInfo(
            method=f"hf_moeprune {scheme} (group size {quantization.get('group_size')})",
            bits=8 if scheme == "int8" else 4,
            modules="experts + attention" + (" + lm_head" if quantization.get("include_lm_head") else ""),
        )
    return None


def _check_repo_id(repo_id: Any, name: str = "repo_id") -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"{name}={repo_id!r} is not a valid Hub repo id ('name' or 'namespace/name'): {exc}") from None
    if not repo_id:
        raise ValueError(f"{name}={repo_id!r} is not a valid Hub repo id ('name' or 'namespace/name')")


def _load_config(model_dir_or_config) -> tuple[dict[str, Any], Path | None]:
    if isinstance(model_dir_or_config, (str, os.PathLike)):
        folder = Path(model_dir_or_config)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a model folder: {str(path)!r} does not exist")
        return json.loads(path.read_text(encoding="utf-8")), folder
    if isinstance(model_dir_or_config, dict):
        return dict(model_dir_or_config), None
    if hasattr(model_dir_or_config, "to_dict"):
        return model_dir_or_config.to_dict(), None
    raise TypeError(
        f"expected a model folder, a config dict or a PreTrainedConfig, got {type(model_dir_or_config).__name__}"
    )


def stored_parameter_count(folder: Path) -> int | None:
    """Parameters in the folder's safetensors files, read from their headers only (no tensor is loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        header = read_header(path)
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total


def _format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def build_model_card(
    model_dir_or_config,
    info: CardInfo | None = None,
    *,
    repo_id: str | None = None,
    plot_file: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of a pruned model.

    ``model_dir_or_config`` is a saved model folder, a config dict or a ``PreTrainedConfig``. With a folder,
    the card also reports the stored parameter count and, when a tokenizer is stored, loads it in the
    snippets. ``repo_id`` goes into the loading snippets; ``plot_file`` (relative to the folder) is shown
    as the per-layer plot.
    """
    info = info if info is not None else CardInfo()
    if repo_id is not None:
        _check_repo_id(repo_id)
    config, folder = _load_config(model_dir_or_config)
    layout = pruned_layout(config)
    kind = checkpoint_kind(config)
    family = layout.family if layout is not None else str(base_model_type(config))
    quantization = info.quantization or quantization_from_config(config)
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {str(template)!r} does not exist; pass template_path=")

    tags = ["hf_moeprune", "moe", "mixture-of-experts", *(["expert-pruning"] if layout else []), family]
    if kind == "compressed_tensors":
        tags.append("compressed-tensors")
    tags += [t for t in info.tags if t not in tags]
    card_data = ModelCardData(
        base_model=info.base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=info.license,
        tags=tags,
        datasets=list(info.datasets) or None,
    )
    rows = [
        {
            "layer": i,
            "kept": count,
            "removed": None if count is None else layout.original_num_experts - count,
            "ids": None if ids is None else ", ".join(map(str, ids)),
        }
        for i, (count, ids) in enumerate(zip(layout.experts_per_layer, layout.kept_expert_ids))
    ] if layout is not None else []  # fmt: skip
    counts = [c for c in layout.experts_per_layer if c is not None] if layout is not None else [0]
    has_tokenizer = folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)
    parameters = stored_parameter_count(folder) if folder is not None else None
    default_title = f"Pruned {family} MoE" if layout is not None else f"{family} MoE"
    title = info.model_name or (repo_id.split("/")[-1] if repo_id else default_title)
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        title=title,
        info=info,
        layout=layout,
        rows=rows,
        min_experts=min(counts),
        max_experts=max(counts),
        uniform=len(set(counts)) == 1,
        sparsity_pct=f"{100 * layout.sparsity:.1f}" if layout is not None else None,
        family=family,
        kind=kind,
        ct_scheme=_ct_scheme_text(config),
        parameters=_format_count(parameters) if parameters is not None else None,
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        has_tokenizer=has_tokenizer,
        plot_file=plot_file,
        quantization=quantization,
        distillation=info.distillation,
        evaluation=info.evaluation,
    )


def write_model_card(
    model_dir: str | os.PathLike,
    info: CardInfo | None = None,
    *,
    repo_id: str | None = None,
    overwrite: bool = False,
    template_path: str | os.PathLike | None = None,
    destination: str | os.PathLike | None = None,
) -> Path:
    """Write ``README.md`` (and the per-layer plot, when matplotlib is importable) into ``model_dir``
    (or into ``destination``, e.g. a staging folder, describing the model in ``model_dir``).

    An existing README.md or plot is left alone unless ``overwrite``; on failure neither file is left
    half-written. Returns the path of the card.
    """
    info = info if info is not None else CardInfo()
    folder = Path(model_dir)
    out = Path(destination) if destination is not None else folder
    card_path = out / CARD_FILENAME
    plot_path = out / PLOT_FILENAME
    want_plot = info.plot and _matplotlib_available() and pruned_layout(_load_config(folder)[0]) is not None
    if not overwrite:
        taken = [str(p) for p in (card_path, plot_path if want_plot else None) if p is not None and p.exists()]
        if taken:
            raise FileExistsError(f"{taken} already exist; pass overwrite=True to replace them")
    # Render first: a bad config or template fails before anything is written.
    card = build_model_card(
        folder,
        info,
        repo_id=repo_id,
        plot_file=PLOT_FILENAME if want_plot else None,
        template_path=template_path,
    )
    if want_plot:
        layout = expert_layout(_load_config(folder)[0])
        with atomic_output_file(plot_path) as tmp:
            plot_expert_counts(layout, tmp)
    try:
        atomic_write_bytes(card_path, card.content.encode("utf-8"))
    except BaseException:
        if want_plot:
            plot_path.unlink(missing_ok=True)
        raise
    logger.info("wrote model card %s%s", card_path, f" and plot {plot_path}" if want_plot else "")
    return card_path
