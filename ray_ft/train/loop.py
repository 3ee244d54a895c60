"""The per-worker training loop for causal-LM methods (LoRA, QLoRA, prompt tuning) on DeepSpeed.

:func:`train_fn_per_worker` is what every Ray Train worker runs: :class:`CausalLMRecipe` sets up data, model,
optimizer/DeepSpeed engine, resume state and logger (``_setup_*``), then :meth:`CausalLMRecipe.train` runs the
loop: ``_loss_step`` per micro-batch, :meth:`CausalLMRecipe.validate` at evaluation steps, a report per step.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from ray_ft.config import ConfigError
from ray_ft.data import PromptFormat, encode_generation
from ray_ft.device import select_device
from ray_ft.logs import configure, info_rank_zero
from ray_ft.models import load_tokenizer
from ray_ft.tensors import batch_counts, collate
from ray_ft.tracking import StepLogger
from ray_ft.train.batching import Batches, StreamedBatches, plan_steps, read_shard
from ray_ft.train.checkpointing import load_deepspeed_checkpoint, report_step, save_deepspeed_checkpoint
from ray_ft.train.inputs import WorkerInput
from ray_ft.train.loss import answer_only_logits, causal_lm_loss, validation_loss
from ray_ft.train.optim import adamw_with_schedule, deepspeed_config
from ray_ft.train.progress import Progress
from ray_ft.train.runtime import all_reduce, keep_freed_memory, process_group, quiet_report_log

logger = logging.getLogger(__name__)


def train_fn_per_worker(inputs: WorkerInput) -> None:
    """The training loop run by every Ray Train worker (and by the driver in local mode)."""
    configure()
    quiet_report_log()
    with process_group():
        recipe = CausalLMRecipe(inputs)
        recipe.setup()
        recipe.train()


class CausalLMRecipe:
    """One worker's run: :meth:`setup` once, then :meth:`train`."""

    def __init__(self, inputs: WorkerInput):
        import ray.train

        self.inputs, self.cfg = inputs, inputs.config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.method = inputs.method

    # ----------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        self._setup_device()
        torch.manual_seed(cfg.train.seed)
        train_enc = self._setup_data()
        self._setup_batches(train_enc)  # before the model loads: a streamed run starts reading meanwhile
        model = self._setup_model()
        n_train = len(train_enc) if self.inputs.n_train is None else self.inputs.n_train
        self.steps_per_epoch, self.total_steps = plan_steps(cfg, n_train, self.world)
        self._setup_optimizer(model)
        self._setup_resume()
        self._setup_logger()
        self.eval_every = cfg.train.eval_every or self.steps_per_epoch
        self.answer_only = answer_only_logits(self.engine.module)

    def _setup_device(self) -> None:
        import ray.train.torch

        cfg = self.cfg
        # Ray assigned this worker its device; the dtype rules live in ray_ft.device with every other placement.
        placement = select_device(
            cfg.scaling.use_gpu, cfg.model.dtype, training=True, device=ray.train.torch.get_device()
        )
        self.device, self.use_gpu = placement.device, placement.on_gpu
        if not self.use_gpu:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
            keep_freed_memory()
        if cfg.train.fused_linear_cross_entropy and not self.use_gpu:
            raise ConfigError(
                ["train.fused_linear_cross_entropy: this worker has no CUDA GPU (Liger's kernels need one)"]
            )

    def _setup_data(self) -> list[dict]:
        """Tokenise this worker's data; sets the validation batches, returns the encoded training examples."""
        import ray.train

        cfg, inputs = self.cfg, self.inputs
        self.tokenizer = load_tokenizer(inputs.model_dir, cfg.model.trust_remote_code)
        fmt = PromptFormat.from_config(cfg.data)

        def encode(records: list[dict]) -> list[dict]:
            return [encode_generation(r, self.tokenizer, fmt, cfg.data.max_length, cfg.data.train_on) for r in records]

        train_enc = encode(inputs.train_records)
        batch_size, pad_id = cfg.train.batch_size, self.tokenizer.pad_token_id
        if inputs.streamed_val:  # this rank's share of the validation set, tokenised by Ray Data
            val_enc = read_shard(ray.train.get_dataset_shard("val"))
            first, stride = 0, batch_size
        else:
            val_enc = encode(inputs.val_records)
            first, stride = self.rank * batch_size, batch_size * self.world
        self.val_batches = [collate(val_enc[i : i + batch_size], pad_id) for i in range(first, len(val_enc), stride)]
        # ZeRO-3 gathers parameters collectively in every forward, so all ranks must run as many validation
        # forwards: a rank short of data repeats a batch without answer tokens (it adds nothing to the loss).
        if val_enc:
            filler = collate(val_enc[:1], pad_id)
            filler["labels"].fill_(-100)
            self.val_batches += [filler] * (math.ceil(len(val_enc) / stride) - len(self.val_batches))
        return train_enc

    def _setup_model(self) -> torch.nn.Module:
        return self.method.load_for_training(self.cfg, self.inputs.model_dir, self.device)

    def _setup_optimizer(self, model: torch.nn.Module) -> None:
        """AdamW and its schedule over the trainable parameters, wrapped by the DeepSpeed engine."""
        import deepspeed

        cfg = self.cfg
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = adamw_with_schedule(cfg, self.trainable, self.total_steps, fused=self.use_gpu)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world, bf16),
            dist_init_required=False,
        )
        if cfg.train.compile:
            info_rank_zero(logger, "[ray-ft] train.compile: compiling the model; the first step includes compile time")
            self.engine.compile(backend="inductor", compile_kwargs={"dynamic": True})

    def _setup_resume(self) -> None:
        import ray.train

        self.start_step = 0
        self.seen = {"samples_seen": 0.0, "tokens_seen": 0.0}  # examples and tokens trained on, all ranks
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            self.start_step, self.seen = load_deepspeed_checkpoint(self.engine, checkpoint)
            info_rank_zero(logger, "[ray-ft] resumed from step %d/%d", self.start_step, self.total_steps)

    def _setup_logger(self) -> None:
        self.step_logger = StepLogger(self.inputs.tracking_uri, self.inputs.run_id) if self.rank == 0 else None
        if self.step_logger is not None:
            # ZeRO-3 has partitioned the parameters by now; ``ds_numel`` is the full size.
            n = sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable)
            self.step_logger.log({"trainable_params": n}, step=self.start_step)

    def _setup_batches(self, train_enc: list[dict]) -> None:
        """This worker's micro-batches: from its Ray Data shard (``data.streaming``, see ``build_trainer``), which a
        fresh run starts reading now, or from the examples it tokenised."""
        import ray.train

        cfg, pad_id = self.cfg, self.tokenizer.pad_token_id
        if not cfg.data.streaming:
            self.batches = Batches(
                train_enc, cfg.train.batch_size, self.rank, self.world, cfg.train.seed, pad_id, cfg.train.packing
            )
            return
        per_epoch = math.ceil(self.inputs.n_train // self.world / cfg.train.batch_size)
        self.batches = StreamedBatches(
            ray.train.get_dataset_shard("train"),
            cfg.train.batch_size,
            self.rank,
            cfg.train.seed,
            pad_id,
            cfg.train.packing,
            per_epoch=per_epoch,
        )
        if ray.train.get_checkpoint() is None:  # a resumed run starts mid-epoch: it reads once it knows where
            self.batches.prefetch()

    # ----------------------------------------------------------------------- loop

    def train(self) -> None:
        cfg, engine = self.cfg, self.engine
        progress = Progress(self.start_step, self.total_steps, self.device, cfg.train.compile)
        engine.train()
        for step in range(self.start_step, self.total_steps):
            loss, tokens, samples = self._train_step(step)
            progress.count(step, tokens, samples)
            self.seen["samples_seen"] += samples
            self.seen["tokens_seen"] += tokens
            done = step + 1
            metrics: dict[str, Any] = {
                "step": done,
                "epoch": done / self.steps_per_epoch,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                **self.seen,
            }
            is_eval = done % self.eval_every == 0 or done == self.total_steps
            progress.measure(step, metrics, report_rate=is_eval or done % cfg.train.log_every == 0)
            if is_eval and self.val_batches:
                metrics["val_loss"] = self.validate()
            if self.step_logger is not None:
                logger.info("%s", progress.line(metrics))
                self.step_logger.log({k: v for k, v in metrics.items() if k != "step"}, step=done)
            write = functools.partial(
                save_deepspeed_checkpoint, engine, self.method, self.tokenizer, metrics, self.rank, done
            )
            report_step(cfg, metrics, done, is_eval, write)

    def _train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns the mean loss, tokens and examples,
        averaged (loss) or summed over ranks."""
        accum = self.cfg.train.grad_accum
        loss_sum, tokens, samples = 0.0, 0, 0
        for micro in range(accum):
            batch = {k: v.to(self.device) for k, v in self.batches.get(step * accum + micro).items()}
            loss_sum += self._loss_step(batch)
            n_tokens, n_examples = batch_counts(batch)
            tokens += n_tokens
            samples += n_examples
        loss_mean, tokens_all, samples_all = all_reduce([loss_sum / accum, float(tokens), float(samples)])
        return loss_mean / self.world, tokens_all, samples_all

    def _loss_step(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward, backward and (at the accumulation boundary, DeepSpeed decides) the optimizer step."""
        loss = causal_lm_loss(self.engine, batch, self.answer_only, self.cfg.train.fused_linear_cross_entropy)
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def validate(self) -> float:
        """Validation loss over all ranks' validation batches."""
        return validation_loss(self.engine, self.val_batches, self.device, self.answer_only)
