"""``MoEPruneTrainer``: fine-tune an MoE model and physically remove its least useful experts as it trains."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_moeprune import compat
from hf_moeprune.adapters import get_adapter
from hf_moeprune.balancing.placement import plan_placement
from hf_moeprune.balancing.router import bias_update, heterogeneous_load_balancing_loss, max_violation, router_z_loss
from hf_moeprune.distributed import check_trainer_setup
from hf_moeprune.format import enable_selection_bias, mark_pruned
from hf_moeprune.format.layout import saved_kept_expert_ids
from hf_moeprune.format.modeling_moeprune import SELECTION_BIAS
from hf_moeprune.lora import (
    experts_have_trainable_tensors,
    has_adapters,
    is_peft_model,
    load_base_weights,
    save_adapter_and_base,
)
from hf_moeprune.observation import RoutingInstrumentation
from hf_moeprune.pruning.allocation import AllocationSpec, LayerBudget
from hf_moeprune.pruning.budgets import layer_budgets
from hf_moeprune.pruning.schedules import ScheduleSpec
from hf_moeprune.pruning.statistics import ExpertStatistics
from hf_moeprune.surgery import permute_experts, prune_experts, unwrap_model
from hf_moeprune.training.arguments import MoEPruneArguments, MoEPruneArgumentsMixin
from hf_moeprune.training.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    last_complete_checkpoint,
    load_pruning_state,
    save_pruning_state,
)
from hf_moeprune.training.controller import Decision, PruningController
from hf_moeprune.training.optim import OptimizerStateSlicer
from hf_moeprune.training.report import write_report
from hf_moeprune.utils import fault_point, without_secrets

logger = logging.getLogger(__name__)
compat.check_trainer_overrides()  # _save_checkpoint, _load_from_checkpoint, _save below override private methods

BASE_SUBDIR = "base_model"  # LoRA runs: the pruned base model next to the adapter
# criteria that read the router-weighted expert output norms (the only statistic that needs per-expert outputs)
REAP_CRITERIA = ("reap", "reap_frequency")


class _PruningCallback(TrainerCallback):
    """Hooks the trainer's pruning logic into the training loop at optimizer-step boundaries."""

    def __init__(self, trainer: MoEPruneMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_pruning(state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        # fixed for the whole optimizer step (all micro-batches and any activation-checkpoint recomputation)
        self.trainer.instrumentation.reap_active = state.global_step % args.prune_reap_interval == 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._needs_saliency:
            self.trainer.instrumentation.accumulate_saliency()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._finish_pruning()


class MoEPruneMixin:
    """Dynamic expert pruning for any ``transformers.Trainer`` subclass: measures expert importance while it trains
    and removes the least important experts physically (see ``MoEPruneArgumentsMixin`` for every knob). The rest of
    training runs on the smaller model; optimizer moments of the kept experts (and of their LoRA factors) carry
    over, and ``save_model`` writes a model that ``AutoModelForCausalLM.from_pretrained`` loads (after
    ``import hf_moeprune``), or for a LoRA run the adapter plus its pruned base.

    Put it first: ``class MoEPruneSFTTrainer(MoEPruneMixin, SFTTrainer)``, configured by a config class that mixes
    ``MoEPruneArgumentsMixin`` into the trainer's own (``MoEPruneSFTConfig``). The router load-balancing loss is
    added here, per layer, for every family; a parent trainer's own aux loss (TRL's) is switched off so it counts
    once."""

    args: MoEPruneArgumentsMixin
    default_args_class: type | None = None  # used when no args are given (MoEPruneTrainer: MoEPruneArguments)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the other order silently trains without pruning: the trainer's compute_loss and __init__ come first
        mro = cls.__mro__
        first_trainer = next((i for i, c in enumerate(mro) if i and issubclass(c, Trainer)), None)
        if first_trainer is not None and mro.index(MoEPruneMixin) > first_trainer:
            raise TypeError(
                f"{cls.__name__}: list MoEPruneMixin before {mro[first_trainer].__name__} in the bases, e.g. "
                f"class {cls.__name__}(MoEPruneMixin, {mro[first_trainer].__name__})"
            )

    def __init__(self, model=None, args: MoEPruneArgumentsMixin | None = None, *pargs, **kwargs):
        name = type(self).__name__
        if args is None and self.default_args_class is not None:
            args = self.default_args_class(output_dir="outputs/moeprune")
        if not isinstance(args, MoEPruneArgumentsMixin):
            raise TypeError(
                f"{name} needs arguments that include MoEPruneArgumentsMixin (MoEPruneArguments, MoEPruneSFTConfig or "
                f"your own dataclass mixing it in), got {type(args).__name__}"
            )
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{name} needs a model instance, got {type(model).__name__} (model_init and model names are not "
                "supported: pruning changes shapes)"
            )
        base = unwrap_model(model)
        check_trainer_setup(base, args)  # DeepSpeed: refused before anything reads the (partitioned) experts
        self.adapter = get_adapter(base)
        moe_layers = self.adapter.moe_layer_indices(base)
        if not moe_layers:
            raise ValueError(
                f"model of type {base.config.model_type!r} has no MoE layers "
                f"(looked for {self.adapter.router_path} in every decoder layer)"
            )
        mark_pruned(base, self.adapter)  # the pruned class from the start: checkpoints keep one format
        if args.router_bias_update_rate > 0 and not self.adapter.has_native_selection_bias:
            # the balancing bias lives in the model (a router buffer), so checkpoints and the saved model keep it
            enable_selection_bias(base, self.adapter)
        self._budgets = self._make_budgets(base, args)
        # a PeftModel is given to Trainer as it is (it saves, loads and counts trainable parameters as an adapter)
        super().__init__(model if is_peft_model(model) else base, args, *pargs, **kwargs)
        self.statistics = ExpertStatistics(
            {layer: b.current for layer, b in self._budgets.items()},
            window=args.prune_stats_window,
            decay=args.prune_stats_decay,
        )
        self.instrumentation = RoutingInstrumentation(
            self.moe_model, self.adapter, self.statistics, record_reap=args.prune_criterion in REAP_CRITERIA
        )
        self.instrumentation.attach()
        self.controller: PruningController | None = None
        self._pending_controller_state: dict | None = None
        self._step_losses: list[torch.Tensor] = []
        self._needs_saliency = args.prune_criterion == "saliency"
        if self._needs_saliency:
            self._check_saliency_has_gradients()
        self._aux_coef = (
            args.router_aux_loss_coef
            if args.router_aux_loss_coef is not None
            else float(getattr(base.config, "router_aux_loss_coef", 0.0) or 0.0)
        )
        self._forward_takes_router_flag = "output_router_logits" in inspect.signature(base.forward).parameters
        self._take_over_aux_loss(base)
        self._export_stock = args.prune_export_stock
        self.add_callback(_PruningCallback(self))

    # -- set-up ------------------------------------------------------------------------------
    def _take_over_aux_loss(self, base: nn.Module) -> None:
        """TRL's trainers add the model's own aux loss (``aux_loss_enabled``, router logits switched on in the
        config); this class adds its per-layer one. Keep one: this one, the same for every parent trainer."""
        if getattr(self, "aux_loss_enabled", False):
            self.aux_loss_enabled = False
            text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
            text_config.output_router_logits = False
            logger.info(
                "%s: router aux loss (coef %g) added once, per layer, by MoEPruneMixin; the parent trainer's is off",
                type(self).__name__, self._aux_coef,
            )  # fmt: skip

    @property
    def moe_model(self) -> nn.Module:
        """The transformers model whose experts are pruned (inside DDP, accelerate and peft wrappers)."""
        return unwrap_model(self.model)

    def _check_saliency_has_gradients(self) -> None:
        model = self.moe_model
        layers = self.adapter.decoder_layers(model)
        frozen = [
            i
            for i in self.adapter.prunable_layer_indices(model)  # keep-all layers need no scores
            if not experts_have_trainable_tensors(self.adapter.experts(layers[i]), self.adapter.num_experts(layers[i]))
        ]
        if frozen:
            raise ValueError(
                f"prune_criterion='saliency' needs per-expert gradients, but the experts of MoE layer(s) {frozen} are "
                "frozen and carry no per-expert adapter; train them, add LoRA on the experts (peft "
                "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']) or use a routing criterion "
                "(reap, reap_frequency, frequency, prob_mass)"
            )

    def _make_budgets(self, model, args: MoEPruneArguments) -> dict[int, LayerBudget]:
        top_k = self.adapter.top_k(model.config)
        multiple = math.lcm(args.prune_multiple_of, max(args.balance_ep_size, 1))
        budgets = layer_budgets(model, self.adapter, args.prune_min_experts, multiple)
        total = sum(b.original for b in budgets.values())
        removable = sum(b.current - b.lowest for b in budgets.values()) + sum(
            b.original - b.current for b in budgets.values()
        )
        if round(args.prune_target * total) > removable:
            fixed = sorted(layer for layer, b in budgets.items() if b.keep_all)
            whole = f" (MoE layers {fixed} keep all their experts)" if fixed else ""
            raise ValueError(
                f"prune_target={args.prune_target} asks to remove {round(args.prune_target * total)} of {total} routed "
                f"experts, but with top-k={top_k}, prune_min_experts={args.prune_min_experts} and "
                f"prune_multiple_of={args.prune_multiple_of} each layer must keep at least "
                f"{min((b.lowest for b in budgets.values() if not b.keep_all), default=0)}{whole}: at most "
                f"{removable / total:.3f} can be removed"
            )
        return budgets

    def _start_pruning(self, max_steps: int) -> None:
        args = self.args
        start = args.prune_start_step if args.prune_start_step is not None else max(1, int(0.1 * max_steps))
        end = args.prune_end_step if args.prune_end_step is not None else max(start, int(0.5 * max_steps))
        original_ids = {layer: list(self.moe_model.config.kept_expert_ids[layer]) for layer in self._budgets}
        self.controller = PruningController(
            budgets=self._budgets,
            original_ids=original_ids,
            statistics=self.statistics,
            criterion=args.prune_criterion,
            schedule=args.prune_schedule,
            schedule_spec=ScheduleSpec(args.prune_target, start, end, args.prune_frequency),
            allocation=AllocationSpec(
                args.prune_allocation if args.prune_layer_adaptive else "uniform",
                args.prune_laep_alpha,
                args.prune_laep_beta,
            ),
            stable_window=args.prune_stable_window,
            stable_threshold=args.prune_stable_threshold,
            grace_steps=args.prune_grace_steps,
            grace_tolerance=args.prune_grace_tolerance,
        )
        if self._pending_controller_state is not None:
            self.controller.load_state_dict(self._pending_controller_state)
            self._restore_masks(self._pending_controller_state)
            self._pending_controller_state = None
        logger.info(
            "expert pruning: criterion=%s schedule=%s target=%.2f steps %d..%d, %d MoE layers",
            args.prune_criterion, args.prune_schedule, args.prune_target, start, end, len(self._budgets),
        )  # fmt: skip

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        inst = self.instrumentation
        want_logits = training and (self._aux_coef > 0 or self.args.router_z_loss_coef > 0)
        if self._forward_takes_router_flag:
            # the aux loss is computed here for every family; the model's own one would count twice
            inputs = {**inputs, "output_router_logits": False}
        inst.token_mask = inputs.get("attention_mask")
        inst.recording, inst.capture_logits = training, want_logits
        try:
            # return_outputs passed through: TRL's trainers run an extra forward for outputs (and it would be
            # recorded twice)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = result if return_outputs else (result, None)
        finally:
            inst.recording, inst.capture_logits, inst.token_mask = False, False, None
        if training:
            self._step_losses.append(loss.detach().float())
            if want_logits:
                logits = inst.take_router_logits()
                # with loss kwargs the CE is already normalised over the whole accumulated batch
                scale = (
                    1.0 / self.args.gradient_accumulation_steps
                    if self.model_accepts_loss_kwargs and num_items_in_batch is not None
                    else 1.0
                )
                mask = inputs.get("attention_mask")
                if self._aux_coef > 0:
                    aux = heterogeneous_load_balancing_loss(
                        logits, self.adapter.top_k(self.moe_model.config), mask, self.adapter.scores
                    )
                    loss = loss + scale * self._aux_coef * aux.to(loss.device)
                if self.args.router_z_loss_coef > 0:
                    loss = loss + scale * self.args.router_z_loss_coef * router_z_loss(logits, mask).to(loss.device)
        return (loss, outputs) if return_outputs else loss

    # -- per-step pruning ----------------------------------------------------------------------
    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes > 1:
            tensor = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()
        return tensor

    def _after_optimizer_step(self, step: int) -> None:
        losses, self._step_losses = self._step_losses, []
        local = torch.stack(losses).mean() if losses else torch.tensor(0.0)
        loss = float(self._reduce_sum(local.reshape(1).cpu().double())[0] / self.accelerator.num_processes)
        loads = self._reduced_step_loads()
        self._balance_router(loads)
        decision = self.controller.step(step, loss, lambda: self.statistics.snapshot(self._reduce_sum))
        self._apply(decision)
        if loads and self.args.logging_steps and step % self.args.logging_steps == 0:
            self._log_balance(loads)

    def _reduced_step_loads(self) -> dict[int, torch.Tensor]:
        loads, self.instrumentation.step_loads = self.instrumentation.step_loads, {}
        if not loads:
            return {}
        layers = sorted(loads)
        flat = self._reduce_sum(torch.cat([loads[layer].double() for layer in layers]))
        out, offset = {}, 0
        for layer in layers:
            n = loads[layer].numel()
            out[layer] = flat[offset : offset + n]
            offset += n
        return out

    def _balance_router(self, loads: dict[int, torch.Tensor]) -> None:
        rate = self.args.router_bias_update_rate
        if rate <= 0 or not loads:
            return
        layers = self.adapter.decoder_layers(self.moe_model)
        fixed = self.adapter.keep_all_layers(self.moe_model.config)
        for layer, load in loads.items():
            if layer in fixed:  # experts picked by a token-id table: no score for a bias to shift
                continue
            router = self.adapter.router(layers[layer])
            # DeepSeek-V3's native e_score_correction_bias, or the selection_bias buffer given to other families
            name = "e_score_correction_bias" if self.adapter.has_native_selection_bias else SELECTION_BIAS
            # the routed experts' entries: a native bias may go on over extra router rows (LongCat's zero experts)
            bias = getattr(router, name)[: load.numel()]
            with torch.no_grad():
                bias.copy_(bias_update(bias, load.to(bias.device), rate))

    def _log_balance(self, loads: dict[int, torch.Tensor]) -> None:
        logs = {f"moe/maxvio/layer_{layer}": max_violation(load) for layer, load in loads.items()}
        logs["moe/maxvio/mean"] = sum(logs.values()) / len(logs)
        logs["moe/routed_experts"] = float(sum(b.current for b in self.controller.budgets.values()))
        self._log_event(logs)

    def _apply(self, decision: Decision) -> None:
        inst = self.instrumentation
        for layer, positions in decision.unmask.items():
            if layer in inst.masked:
                inst.masked[layer][positions] = False
        for layer, positions in decision.mask.items():
            masked = inst.masked.setdefault(layer, torch.zeros(self._budget(layer).current, dtype=torch.bool))
            masked[positions] = True
        if decision.remove:
            self._remove(decision.remove)
        if decision.mask or decision.unmask or decision.remove:
            self._log_event(self._event_logs())

    def _budget(self, layer: int) -> LayerBudget:
        return self.controller.budgets[layer]

    def _remove(self, plan: dict[int, list[int]]) -> None:
        slicer = OptimizerStateSlicer(self.optimizer)
        if self.args.prune_merge:
            from hf_moeprune.pruning.merging import merge_before_removal

            # the statistics the decision saw (the controller has already narrowed its own to the kept experts)
            tokens = {layer: s.tokens for layer, s in self.controller.decision_stats.items()}
            merge_before_removal(self.model, plan, tokens, optimizer=self.optimizer)  # AdamW moments fold too
        prune_experts(self.model, plan, on_tensor_replaced=slicer)
        for layer, kept in plan.items():
            self.instrumentation.select(layer, torch.tensor(kept))
        if self.args.balance_ep_size > 1:
            self._rearrange_for_expert_parallel(slicer)
        self._rewrap_distributed()
        logger.info("experts per layer now %s", self.moe_model.config.experts_per_layer)

    def _rearrange_for_expert_parallel(self, slicer: OptimizerStateSlicer) -> None:
        """Reorder experts so each expert-parallel rank's block gets equal load; the loads are the reduced
        statistics, so every process computes the same plan. Outputs do not change."""
        fixed = self.adapter.keep_all_layers(self.moe_model.config)  # their experts stay in checkpoint order
        loads = {
            layer: stats.tokens
            for layer, stats in self.statistics.snapshot(self._reduce_sum).items()
            if layer not in fixed
        }
        plan = plan_placement(
            loads, self.args.balance_ep_size, num_groups=self.adapter.num_groups(self.moe_model.config)
        )
        orders = plan.orders_by_layer()
        if not orders:
            return
        permute_experts(self.model, orders, on_tensor_replaced=slicer)
        for layer, order in orders.items():
            self.instrumentation.select(layer, torch.tensor(order))
        self.controller.follow(orders)
        summary = plan.summary()
        self._log_event({
            "moe/balancedness_before": summary["mean_balancedness_before"],
            "moe/balancedness_after": summary["mean_balancedness_after"],
        })  # fmt: skip

    def _log_event(self, logs: dict[str, float]) -> None:
        """Log pruning/balancing metrics from inside ``on_step_end`` without eating the step's own log.

        ``Trainer.log`` ends in ``callback_handler.on_log``, which clears ``control.should_log``; the default flow
        callback has already set it for this step, so the loss/grad_norm/learning_rate log that follows would be
        skipped. The base ``Trainer.log`` is called (not ``self.log``) so that a subclass's ``log`` that flushes
        its own per-step metrics (TRL's trainers do) keeps them for the step's regular log entry."""
        should_log = self.control.should_log
        Trainer.log(self, logs)
        self.control.should_log = should_log

    def _event_logs(self) -> dict[str, float]:
        logs = {f"prune/experts/layer_{layer}": float(b.current) for layer, b in self.controller.budgets.items()}
        logs["prune/experts/total"] = float(sum(b.current for b in self.controller.budgets.values()))
        logs["prune/masked"] = float(sum(int(m.sum()) for m in self.instrumentation.masked.values()))
        return logs

    def _rewrap_distributed(self) -> None:
        # FSDP2 and transformers' expert parallelism need nothing here: surgery re-shards through FSDP's own
        # per-parameter state (hf_moeprune.distributed), and the model is its own wrapper
        wrapped = self.model_wrapped
        if not isinstance(wrapped, nn.parallel.DistributedDataParallel):
            return
        # DDP's reducer holds the replaced parameters: rebuild the wrapper in place (why: see compat.rebuild_ddp)
        compat.rebuild_ddp(wrapped, self.model)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        # The pruning state goes in first: Trainer writes trainer_state.json last (after weights, optimizer and
        # RNG; transformers 5.24), so a checkpoint with a readable trainer_state.json also has a complete
        # pruning state, and one killed earlier is recognised as partial on resume (see checkpoint.py).
        if self.controller is not None and self.args.should_save:
            folder = Path(compat.trainer_output_dir(self, trial)) / f"checkpoint-{self.state.global_step}"
            state = self.controller.state_dict()  # the balancing bias is a model buffer, saved with the weights
            state["masked"] = self.instrumentation.masked
            save_pruning_state(folder, state)
            fault_point("train.checkpoint.state_written")
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (a partial
        one left by a killed run is skipped with a warning), and an explicit partial checkpoint is refused with
        a ``CheckpointError`` naming what is missing, before anything is loaded."""
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(self.args.output_dir)
            if found is None:
                raise CheckpointError(f"no complete checkpoint-N folder in output_dir {self.args.output_dir!r}")
            resume_from_checkpoint = str(found)
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise CheckpointError(f"cannot resume: {problem}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_masks(self, state: dict) -> None:
        self.instrumentation.masked = dict(state.get("masked", {}))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Give the model the checkpoint's expert layout before its weights are loaded."""
        config_path = Path(resume_from_checkpoint) / "config.json"
        base_dir = Path(resume_from_checkpoint) / BASE_SUBDIR
        if not config_path.is_file() and (base_dir / "config.json").is_file():
            config_path = base_dir / "config.json"  # a LoRA run: the adapter at the top, the pruned base below
        if config_path.is_file():
            saved = json.loads(config_path.read_text())
            saved_ids = saved_kept_expert_ids(saved)
            if saved_ids is not None:
                current = self.moe_model.config.kept_expert_ids
                plan = {}
                for layer, ids in enumerate(saved_ids):
                    if ids is None or ids == current[layer]:
                        continue
                    missing = sorted(set(ids) - set(current[layer]))
                    if missing:
                        raise ValueError(
                            f"checkpoint {resume_from_checkpoint} layer {layer} keeps expert ids {missing} that this "
                            f"model no longer has (it keeps {current[layer]})"
                        )
                    plan[layer] = [current[layer].index(i) for i in ids]
                if plan:
                    # under FSDP2 the optimizer already exists here (it is prepared with the sharded model), so
                    # its parameters are swapped too; its state is then loaded from the checkpoint
                    prune_experts(self.model, plan, on_tensor_replaced=OptimizerStateSlicer(self.optimizer))
                    for layer, kept in plan.items():
                        self.statistics.select(layer, torch.tensor(kept))
                    logger.info(
                        "resumed expert layout %s from %s", self.moe_model.config.experts_per_layer, config_path
                    )
        if has_adapters(self.moe_model) and base_dir.is_dir():
            # the frozen base changes in training too (the balancing bias buffer): take it from the checkpoint
            load_base_weights(self.moe_model, base_dir)
        self._pending_controller_state = load_pruning_state(resume_from_checkpoint)
        for layer, b in self._pending_controller_state["budgets"].items():
            budget = LayerBudget(**b)
            have = len(self.moe_model.config.kept_expert_ids[int(layer)])
            if budget.current != have:
                raise CheckpointError(
                    f"checkpoint {str(resume_from_checkpoint)!r}: the pruning state has {budget.current} experts in "
                    f"layer {layer} but its config.json keeps {have}; the two files come from different steps"
                )
            self._budgets[int(layer)] = budget
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Checkpoints keep the fused pruned format so that resuming loads them key for key; the final model
        # is exported as the stock architecture when the layout allows (prune_export_stock).
        self._export_stock = self.args.prune_export_stock and not _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._export_stock = self.args.prune_export_stock

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = unwrap_model(self.model)
        if has_adapters(model):
            # the adapter at the top (what PeftModel.from_pretrained reads), the pruned base in BASE_SUBDIR
            save_adapter_and_base(
                self.model,
                output_dir,
                BASE_SUBDIR,
                is_main_process=self.args.should_save,
                export_stock=self._export_stock,
            )
        else:
            model.save_pretrained(
                output_dir,
                state_dict=state_dict,
                is_main_process=self.args.should_save,
                export_stock=self._export_stock,
            )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # the pickled arguments without the Hub token: the folder may be pushed or shared
        torch.save(without_secrets(self.args), os.path.join(output_dir, "training_args.bin"))

    # -- end of training -----------------------------------------------------------------------------
    def _finish_pruning(self) -> None:
        # experts still in a grace period when training stops stay in the model, unmasked
        self.instrumentation.masked = {}
        if self.controller is None or not self.args.prune_report:
            return
        stats = self.statistics.snapshot(self._reduce_sum)  # a collective: every process takes part
        if not self.args.should_save:
            return
        report = self.controller.report(stats)
        paths = write_report(report, self.args.output_dir)
        logger.info("pruning report written to %s", ", ".join(str(p) for p in paths))


class MoEPruneTrainer(MoEPruneMixin, Trainer):
    """A ``transformers.Trainer`` that measures expert importance while it trains and removes the least important
    experts physically (see ``MoEPruneArguments`` for every knob); accepts full models, ``PeftModel`` and models
    with injected LoRA adapters."""

    args: MoEPruneArguments
    default_args_class = MoEPruneArguments
