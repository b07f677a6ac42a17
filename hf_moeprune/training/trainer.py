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

from hf_moeprune.adapters import get_adapter
from hf_moeprune.balancing.placement import plan_placement
from hf_moeprune.balancing.router import bias_update, heterogeneous_load_balancing_loss, max_violation, router_z_loss
from hf_moeprune.format import enable_selection_bias, mark_pruned
from hf_moeprune.format.modeling_moeprune import SELECTION_BIAS
from hf_moeprune.pruning.allocation import AllocationSpec, LayerBudget
from hf_moeprune.pruning.budgets import layer_budgets
from hf_moeprune.pruning.schedules import ScheduleSpec
from hf_moeprune.pruning.statistics import ExpertStatistics
from hf_moeprune.surgery import permute_experts, prune_experts, unwrap_model
from hf_moeprune.training.arguments import MoEPruneArguments
from hf_moeprune.training.controller import Decision, PruningController
from hf_moeprune.training.instrumentation import RoutingInstrumentation
from hf_moeprune.training.optim import OptimizerStateSlicer
from hf_moeprune.training.report import write_report

logger = logging.getLogger(__name__)

STATE_FILE = "moeprune_state.pt"
# criteria that read the router-weighted expert output norms (the only statistic that needs per-expert outputs)
REAP_CRITERIA = ("reap", "reap_frequency")


class _PruningCallback(TrainerCallback):
    """Hooks the trainer's pruning logic into the training loop at optimizer-step boundaries."""

    def __init__(self, trainer: MoEPruneTrainer):
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

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_pruning_state(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._finish_pruning()


class MoEPruneTrainer(Trainer):
    """A ``transformers.Trainer`` that measures expert importance while it trains and removes the least important
    experts physically (see ``MoEPruneArguments`` for every knob). The rest of training runs on the smaller
    model; optimizer moments of the kept experts carry over, and ``save_model`` writes a model that
    ``AutoModelForCausalLM.from_pretrained`` loads (after ``import hf_moeprune``)."""

    args: MoEPruneArguments

    def __init__(self, model=None, args: MoEPruneArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = MoEPruneArguments(output_dir="outputs/moeprune")
        if not isinstance(args, MoEPruneArguments):
            raise TypeError(f"MoEPruneTrainer needs MoEPruneArguments, got {type(args).__name__}")
        if model is None:
            raise ValueError("MoEPruneTrainer needs a model (model_init is not supported: pruning changes shapes)")
        base = unwrap_model(model)
        self.adapter = get_adapter(base)
        moe_layers = self.adapter.moe_layer_indices(base)
        if not moe_layers:
            raise ValueError(
                f"model of type {base.config.model_type!r} has no MoE layers "
                f"(looked for {self.adapter.block_attr}.{self.adapter.router_attr} in every decoder layer)"
            )
        mark_pruned(base, self.adapter)  # the pruned class from the start: checkpoints keep one format
        if args.router_bias_update_rate > 0 and not self.adapter.has_native_selection_bias:
            # the balancing bias lives in the model (a router buffer), so checkpoints and the saved model keep it
            enable_selection_bias(base, self.adapter)
        self._budgets = self._make_budgets(base, args)
        super().__init__(base, args, *pargs, **kwargs)
        self.statistics = ExpertStatistics(
            {layer: b.current for layer, b in self._budgets.items()},
            window=args.prune_stats_window,
            decay=args.prune_stats_decay,
        )
        self.instrumentation = RoutingInstrumentation(
            self.model, self.adapter, self.statistics, record_reap=args.prune_criterion in REAP_CRITERIA
        )
        self.instrumentation.attach()
        self.controller: PruningController | None = None
        self._pending_controller_state: dict | None = None
        self._step_losses: list[torch.Tensor] = []
        self._needs_saliency = args.prune_criterion == "saliency"
        self._aux_coef = (
            args.router_aux_loss_coef
            if args.router_aux_loss_coef is not None
            else float(getattr(base.config, "router_aux_loss_coef", 0.0) or 0.0)
        )
        self._forward_takes_router_flag = "output_router_logits" in inspect.signature(base.forward).parameters
        self._rewrapped = False
        self._export_stock = args.prune_export_stock
        self.add_callback(_PruningCallback(self))

    # -- set-up ------------------------------------------------------------------------------
    def _make_budgets(self, model, args: MoEPruneArguments) -> dict[int, LayerBudget]:
        top_k = self.adapter.top_k(model.config)
        multiple = math.lcm(args.prune_multiple_of, max(args.balance_ep_size, 1))
        budgets = layer_budgets(model, self.adapter, args.prune_min_experts, multiple)
        total = sum(b.original for b in budgets.values())
        removable = sum(b.current - b.lowest for b in budgets.values()) + sum(
            b.original - b.current for b in budgets.values()
        )
        if round(args.prune_target * total) > removable:
            raise ValueError(
                f"prune_target={args.prune_target} asks to remove {round(args.prune_target * total)} of {total} routed "
                f"experts, but with top-k={top_k}, prune_min_experts={args.prune_min_experts} and "
                f"prune_multiple_of={args.prune_multiple_of} each layer must keep at least "
                f"{min(b.lowest for b in budgets.values())}: at most {removable / total:.3f} can be removed"
            )
        return budgets

    def _start_pruning(self, max_steps: int) -> None:
        args = self.args
        start = args.prune_start_step if args.prune_start_step is not None else max(1, int(0.1 * max_steps))
        end = args.prune_end_step if args.prune_end_step is not None else max(start, int(0.5 * max_steps))
        original_ids = {layer: list(self.model.config.kept_expert_ids[layer]) for layer in self._budgets}
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
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
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
                        logits, self.adapter.top_k(self.model.config), mask, self.adapter.scores
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
        layers = self.adapter.decoder_layers(self.model)
        for layer, load in loads.items():
            router = self.adapter.router(layers[layer])
            # DeepSeek-V3's native e_score_correction_bias, or the selection_bias buffer given to other families
            name = "e_score_correction_bias" if self.adapter.has_native_selection_bias else SELECTION_BIAS
            bias = getattr(router, name)
            with torch.no_grad():
                bias.copy_(bias_update(bias, load.to(bias.device), rate))

    def _log_balance(self, loads: dict[int, torch.Tensor]) -> None:
        logs = {f"moe/maxvio/layer_{layer}": max_violation(load) for layer, load in loads.items()}
        logs["moe/maxvio/mean"] = sum(logs.values()) / len(logs)
        logs["moe/routed_experts"] = float(sum(b.current for b in self.controller.budgets.values()))
        self.log(logs)

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
            self.log(self._event_logs())

    def _budget(self, layer: int) -> LayerBudget:
        return self.controller.budgets[layer]

    def _remove(self, plan: dict[int, list[int]]) -> None:
        slicer = OptimizerStateSlicer(self.optimizer)
        if self.args.prune_merge:
            from hf_moeprune.pruning.merging import merge_before_removal

            # the statistics the decision saw (the controller has already narrowed its own to the kept experts)
            tokens = {layer: s.tokens for layer, s in self.controller.decision_stats.items()}
            merge_before_removal(self.model, plan, tokens)
        prune_experts(self.model, plan, on_tensor_replaced=slicer)
        for layer, kept in plan.items():
            self.instrumentation.select(layer, torch.tensor(kept))
        if self.args.balance_ep_size > 1:
            self._rearrange_for_expert_parallel(slicer)
        self._rewrap_distributed()
        logger.info("experts per layer now %s", self.model.config.experts_per_layer)

    def _rearrange_for_expert_parallel(self, slicer: OptimizerStateSlicer) -> None:
        """Reorder experts so each expert-parallel rank's block gets equal load; the loads are the reduced
        statistics, so every process computes the same plan. Outputs do not change."""
        loads = {layer: stats.tokens for layer, stats in self.statistics.snapshot(self._reduce_sum).items()}
        plan = plan_placement(loads, self.args.balance_ep_size, num_groups=self.adapter.num_groups(self.model.config))
        orders = plan.orders_by_layer()
        if not orders:
            return
        permute_experts(self.model, orders, on_tensor_replaced=slicer)
        for layer, order in orders.items():
            self.instrumentation.select(layer, torch.tensor(order))
        self.controller.follow(orders)
        summary = plan.summary()
        self.log({
            "moe/balancedness_before": summary["mean_balancedness_before"],
            "moe/balancedness_after": summary["mean_balancedness_after"],
        })  # fmt: skip

    def _event_logs(self) -> dict[str, float]:
        logs = {f"prune/experts/layer_{layer}": float(b.current) for layer, b in self.controller.budgets.items()}
        logs["prune/experts/total"] = float(sum(b.current for b in self.controller.budgets.values()))
        logs["prune/masked"] = float(sum(int(m.sum()) for m in self.instrumentation.masked.values()))
        return logs

    def _rewrap_distributed(self) -> None:
        wrapped = self.model_wrapped
        if not isinstance(wrapped, nn.parallel.DistributedDataParallel):
            return
        # DDP's reducer holds the replaced parameters. Rebuild the wrapper *in place*: the training loop, the
        # accelerator and `model_wrapped` all hold this object (the loop asks it for `no_sync` during gradient
        # accumulation), and the old reducer with its references to the full-size tensors is released.
        # The new parameters are identical on all ranks, so the initial broadcast changes nothing.
        nn.parallel.DistributedDataParallel.__init__(
            wrapped,
            self.model,
            device_ids=wrapped.device_ids,
            output_device=wrapped.output_device,
            process_group=wrapped.process_group,
            mixed_precision=wrapped.mixed_precision,
            broadcast_buffers=wrapped.broadcast_buffers,
            find_unused_parameters=wrapped.find_unused_parameters,
            gradient_as_bucket_view=wrapped.gradient_as_bucket_view,
            static_graph=wrapped.static_graph,
            bucket_cap_mb=wrapped.bucket_bytes_cap / (1024 * 1024),
        )
        self._rewrapped = True

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_pruning_state(self, step: int) -> None:
        if self.controller is None or not self.args.should_save:
            return
        folder = Path(self._get_output_dir(None)) / f"checkpoint-{step}"
        if folder.is_dir():
            state = self.controller.state_dict()  # the balancing bias is a model buffer, saved with the weights
            state["masked"] = self.instrumentation.masked
            torch.save(state, folder / STATE_FILE)

    def _restore_masks(self, state: dict) -> None:
        self.instrumentation.masked = dict(state.get("masked", {}))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Give the model the checkpoint's expert layout before its weights are loaded."""
        config_path = Path(resume_from_checkpoint) / "config.json"
        if config_path.is_file():
            saved = json.loads(config_path.read_text())
            saved_ids = saved.get("kept_expert_ids") or (saved.get("moeprune_provenance") or {}).get("kept_expert_ids")
            if saved_ids is not None:
                current = self.model.config.kept_expert_ids
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
                    prune_experts(self.model, plan)
                    for layer, kept in plan.items():
                        self.statistics.select(layer, torch.tensor(kept))
                    logger.info("resumed expert layout %s from %s", self.model.config.experts_per_layer, config_path)
        state_path = Path(resume_from_checkpoint) / STATE_FILE
        if state_path.is_file():
            self._pending_controller_state = torch.load(state_path, weights_only=False)
            for layer, b in self._pending_controller_state["budgets"].items():
                self._budgets[int(layer)] = LayerBudget(**b)
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
        model.save_pretrained(
            output_dir,
            state_dict=state_dict,
            is_main_process=self.args.should_save,
            export_stock=self._export_stock,
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

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
