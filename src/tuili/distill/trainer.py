"""The distillation trainer: a student learns from a teacher's logits (and optionally its attention
maps and hidden states) on packed text, with the tools a long CPU or GPU run needs.

- AdamW, linear warm-up then cosine decay to `min_lr`; gradient accumulation and clipping
- bf16 autocast where the processor has bf16 instructions (fp32 master weights)
- the teacher under `no_grad`; its logits optionally cached on disk (`LogitsCache`)
- evaluation of student perplexity every `eval_every` steps beside the teacher's
- checkpoints (student, projections, optimizer, scheduler, data position, RNG) that resume exactly,
  written to a temporary folder and renamed; a CSV and a JSONL log of every step
- data parallel over processes with `torch.distributed` (run under `torchrun`: gloo on CPU,
  NCCL on GPU); process 0 evaluates, logs and writes

`alpha = 0` with no attention or hidden loss is plain fine-tuning on the labels: the teacher is
not run at all, which makes the fair baseline for what distillation adds.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from tuili.data.batches import BatchSampler, shard
from tuili.data.perplexity import perplexity
from tuili.distill.cache import LogitsCache
from tuili.distill.config import _FIXED, LOG_FIELDS, DistillConfig, DistillResult
from tuili.distill.losses import (
    TopKLogits,
    attention_loss,
    distillation_loss,
    hard_loss,
    hidden_loss,
)
from tuili.distill.run_folder import RunFolder
from tuili.distill.runtime import bf16_supported, init_distributed
from tuili.distill.students import Alignment, DistillError, alignment, check_pair
from tuili.models.lazy import onload_all
from tuili.models.model import Model
from tuili.prune.masks import keep_masks
from tuili.quant.linear import quantized_layers


class _Student(nn.Module):
    """The student and its hidden-state projections as one module, so that data parallelism
    averages the projections' gradients too. Returns logits, projected hidden states and attentions."""

    def __init__(
        self, module: nn.Module, hidden_pairs: list[tuple[int, int]], projections: nn.ModuleList | None, attention: bool
    ):
        super().__init__()
        self.module = module
        self.projections = projections
        self.hidden_pairs, self.attention = hidden_pairs, attention

    def forward(self, ids: Tensor):
        out = self.module(ids, output_hidden_states=bool(self.hidden_pairs), output_attentions=self.attention)
        hidden = []
        for k, (s, _) in enumerate(self.hidden_pairs):
            h = out.hidden_states[s]
            hidden.append(self.projections[k](h) if self.projections is not None else h)
        return out.logits, hidden, out.attentions


class Distiller:
    """Trains `student` (in place) from `teacher` on `train` sequences (N, T); see `DistillConfig`.

    `run_dir` holds checkpoints and the logs; with `resume=True` the newest checkpoint there is
    loaded and training continues exactly where it stopped.
    """

    def __init__(
        self,
        teacher: Model | None,
        student: Model,
        train: Tensor,
        config: DistillConfig,
        eval_windows: Tensor | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
    ):
        if config.needs_teacher:
            if teacher is None:
                raise DistillError("this run's losses need a teacher (or set alpha=0 for plain fine-tuning)")
            check_pair(teacher, student)
        quantized = quantized_layers(student.module)
        if quantized:
            raise DistillError(
                f"the student's {quantized[0]} is quantized and cannot be trained: distil first, then quantize"
            )
        self.teacher, self.student, self.config = teacher, student, config
        self.train_ids, self.eval_windows = train, eval_windows
        self.rank, self.world = init_distributed()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.folder = RunFolder(self.run_dir) if self.run_dir is not None else None
        self.progress = progress and self.rank == 0
        self.device = student.module.device
        self.bf16 = bf16_supported(self.device) if config.bf16 is None else config.bf16
        self.align = alignment(teacher, student) if teacher is not None and config.needs_teacher else None
        self.hidden_pairs = self._hidden_pairs()
        self.wrapper = _Student(student.module, self.hidden_pairs, self._projections(), bool(config.attention_loss))
        self.model = nn.parallel.DistributedDataParallel(self.wrapper) if self.world > 1 else self.wrapper
        self.params = [p for p in self.wrapper.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        keep_masks(self.optimizer, student.module)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: config.lr_at(s) / config.lr)
        self.sampler = BatchSampler(train.shape[0], config.batch_size * self.world, config.seed)
        self.step = 0
        self.cache = (
            LogitsCache(config.logits_cache, teacher.module, config.temperature, config.cache_top_k)
            if config.logits_cache and config.alpha > 0
            else None
        )
        self.teacher_ppl: float | None = None
        self.log: list[dict[str, Any]] = []
        if resume:
            self._resume()

    # -- set-up -----------------------------------------------------------------------------
    def _hidden_pairs(self) -> list[tuple[int, int]]:
        """(student, teacher) indices into `hidden_states` (entry i + 1 is layer i's output)."""
        if not self.config.hidden_loss:
            return []
        return [(i + 1, t + 1) for i, t in enumerate(self.align.layers)]

    def _projections(self) -> nn.ModuleList | None:
        s, t = self.student.config.hidden_size, self.teacher.config.hidden_size if self.teacher else None
        if not self.hidden_pairs or s == t:
            return None
        torch.manual_seed(self.config.seed)
        return nn.ModuleList(nn.Linear(s, t, bias=False) for _ in self.hidden_pairs).to(self.device)

    # -- one step ---------------------------------------------------------------------------
    def _teacher_outputs(self, ids: Tensor):
        cfg = self.config
        cached = self.cache.get(ids) if self.cache is not None else None
        if cached is not None:
            return cached.without_last(), [], None
        t = self.teacher.module
        with torch.no_grad(), self._autocast():
            out = t(ids, output_hidden_states=bool(self.hidden_pairs), output_attentions=bool(cfg.attention_loss))
        logits = out.logits
        if self.cache is not None:
            top = TopKLogits.of(logits, cfg.cache_top_k, cfg.temperature)
            self.cache.put(ids, top)
            logits = top.without_last()
        else:
            logits = logits[:, :-1]
        hidden = [out.hidden_states[t_i] for _, t_i in self.hidden_pairs]
        return logits, hidden, out.attentions

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _losses(self, ids: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        with self._autocast():
            s_logits, s_hidden, s_attn = self.model(ids)
        s_logits, labels = s_logits[:, :-1], ids[:, 1:]
        t_logits, t_hidden, t_attn = self._teacher_outputs(ids) if cfg.needs_teacher else (None, [], None)
        if cfg.alpha > 0:
            logit = distillation_loss(s_logits, t_logits, labels, cfg.temperature, cfg.alpha)
            parts = {"loss": logit.total, "soft": logit.soft, "hard": logit.hard}
        else:
            hard = hard_loss(s_logits, labels)
            parts = {"loss": hard, "hard": hard}
        if cfg.attention_loss:
            parts["attention"] = torch.stack(
                [
                    attention_loss(s_attn[i], t_attn[t], cfg.attention_loss, head_map=heads)
                    for i, (t, heads) in enumerate(zip(self.align.layers, self.align.heads))
                ]
            ).mean()
            parts["loss"] = parts["loss"] + cfg.attention_weight * parts["attention"]
        if cfg.hidden_loss:
            parts["hidden"] = torch.stack(
                [hidden_loss(s, t, cfg.hidden_loss) for s, t in zip(s_hidden, t_hidden)]
            ).mean()
            parts["loss"] = parts["loss"] + cfg.hidden_weight * parts["hidden"]
        return parts

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's mean losses."""
        cfg = self.config
        self.wrapper.train()
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            ids = shard(self.train_ids[self.sampler.next()], self.rank, self.world).to(self.device)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            context = nullcontext() if sync else self.model.no_sync()
            with context:
                parts = self._losses(ids)
                (parts["loss"] / cfg.grad_accum).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if self.world > 1:  # log the global batch's losses, not this process's share
            values = torch.tensor(list(totals.values()), dtype=torch.float64)
            dist.all_reduce(values)
            totals = dict(zip(totals, (values / self.world).tolist()))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()  # pruning masks, if any, are re-applied by keep_masks' hook
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**totals, "grad_norm": grad_norm, "lr": lr}

    # -- the run ----------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if self.eval_windows is None:
            return None
        self.wrapper.eval()
        return perplexity(self.student.module, self.eval_windows, progress=False).perplexity

    def train(self) -> DistillResult:
        cfg = self.config
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world * self.train_ids.shape[1]
        if self.rank == 0 and self.eval_windows is not None and self.teacher is not None and self.teacher_ppl is None:
            self.teacher_ppl = perplexity(self.teacher.module, self.eval_windows, progress=False).perplexity
        seconds, tokens, start_step = 0.0, 0, self.step
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="distill" if cfg.needs_teacher else "fine-tune",
            unit="step",
            disable=not self.progress,
            file=sys.stderr,
        )
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                row = self.train_step()
                elapsed = time.perf_counter() - start
                seconds, tokens = seconds + elapsed, tokens + tokens_per_step
                row.update(
                    step=self.step,
                    epoch=self.sampler.epoch,
                    tokens=self.step * tokens_per_step,
                    tokens_per_second=tokens_per_step / elapsed,
                    seconds=elapsed,
                )
                if self.rank == 0 and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    row.update(student_perplexity=self.evaluate(), teacher_perplexity=self.teacher_ppl)
                self._append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint()
        finally:
            bar.close()
        final = next((r["student_perplexity"] for r in reversed(self.log) if r.get("student_perplexity")), None)
        if final is None and self.rank == 0 and self.eval_windows is not None:
            final = self.evaluate()
        self.student.record(
            "distilled" if cfg.needs_teacher else "fine-tuned",
            steps=self.step,
            teacher=self.teacher.source if self.teacher is not None and cfg.needs_teacher else None,
            **{
                k: getattr(cfg, k)
                for k in ("lr", "batch_size", "grad_accum", "temperature", "alpha", "attention_loss", "hidden_loss")
            },
            tokens=self.step * tokens_per_step,
            perplexity=final,
        )
        return DistillResult(self.step - start_step, tokens, seconds, final, self.teacher_ppl, self.log)

    # -- logs and checkpoints (tuili.distill.run_folder) ---------------------------------------
    def _append(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k) for k in LOG_FIELDS}
        self.log.append(row)
        if self.rank == 0 and self.folder is not None:
            self.folder.append(row)

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "student": self.student.module.state_dict(),
            "projections": self.wrapper.projections.state_dict() if self.wrapper.projections is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "teacher_perplexity": self.teacher_ppl,
            "log": self.log,
            "config": dataclasses.asdict(self.config),
            "world_size": self.world,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-NNNNNN in the run folder (temporary name, then rename); keep the newest few."""
        target = None
        if self.rank == 0 and self.folder is not None:
            target = self.folder.save(self._state(), self.step, self.config.keep_checkpoints)
        self._barrier()
        return target

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _resume(self) -> None:
        latest = self.folder.latest() if self.folder is not None else None
        if latest is None:
            return  # nothing to resume: a fresh run
        state = torch.load(latest / "state.pt", map_location=self.device, weights_only=False)
        saved, now = state["config"], dataclasses.asdict(self.config)
        differ = [k for k in _FIXED if saved.get(k) != now.get(k)]
        if state.get("world_size", 1) != self.world:
            differ.append("number of processes")
        if differ:
            raise DistillError(
                f"{latest} was written with other settings ({', '.join(differ)}): "
                "resume with the same ones, or start a fresh run in another folder"
            )
        self.student.module.load_state_dict(state["student"])
        if self.wrapper.projections is not None:
            self.wrapper.projections.load_state_dict(state["projections"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        self.step, self.teacher_ppl, self.log = state["step"], state["teacher_perplexity"], state["log"]
        if self.rank == 0 and self.folder is not None:
            self.folder.rewrite(self.log)
        if self.progress:
            print(f"resumed from {latest} (step {self.step})", file=sys.stderr)


def distill_(
    student: Model,
    config: DistillConfig | None = None,
    *,
    teacher: Model | None,
    train: Tensor,
    eval_windows: Tensor | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Model:
    """Train `student` in place from `teacher` (None: plain fine-tuning, with alpha=0) on packed
    sequences `train` (N, T) and return it. What the run measured is recorded in
    `student.provenance[-1]`; `Distiller(...).train()` returns the whole `DistillResult` (its log)."""
    for m in (student, teacher):
        if m is not None:
            onload_all(m.module)  # training needs every parameter in memory
    Distiller(teacher, student, train, config or DistillConfig(), eval_windows, run_dir, resume, progress).train()
    return student


__all__ = ["Alignment", "DistillConfig", "DistillResult", "Distiller", "distill_", "init_distributed"]
