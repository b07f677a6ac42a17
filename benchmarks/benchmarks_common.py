"""Measurement helpers shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class TrainingMemory(TrainerCallback):
    """Bytes of parameters, gradients, optimizer state and saved activations, per optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.per_step: list[dict] = []
        self._saved = 0
        self._peak_saved = 0

    def _pack(self, tensor):
        self._saved += tensor.numel() * tensor.element_size()
        self._peak_saved = max(self._peak_saved, self._saved)
        return tensor

    def _unpack(self, tensor):
        return tensor

    def on_step_begin(self, args, state, control, **kwargs):
        self._saved = self._peak_saved = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._hooks.__exit__(None, None, None)
        model = self.trainer.model
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        self.per_step.append({"params": params, "grads": grads, "activations": self._peak_saved})

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        state_bytes = sum(
            v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        )
        self.per_step[-1]["optimizer"] = state_bytes
        self.per_step[-1]["total"] = sum(self.per_step[-1].values())
        if torch.cuda.is_available():
            self.per_step[-1]["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
