"""The one generic training loop, used by every stage (tokenizers and priors alike).

A module offers ``param_groups()`` (name -> parameters; VQ-GAN has a generator and a
discriminator group) and ``training_step(batch, step) -> StepOutput`` with one loss per group.
Each group has its own AdamW optimizer and warm-up/cosine schedule; per step and in the order of
``param_groups()``, the trainer back-propagates each group's loss into that group's parameters
only and steps its optimizer.

Under ``torchrun`` every rank trains on its slice of each global batch, through PyTorch's own
engines (``train.*.distributed``): ``ddp`` wraps the step in ``DistributedDataParallel``, whose
buckets all-reduce gradients while the backward pass runs; ``fsdp`` shards the module with
FSDP2's ``fully_shard`` (modules with one optimizer group). Either way the result is that of one
process on the global batch, within float tolerance. The step's losses all come from one forward
pass; every group's loss is back-propagated into its own parameters, and only then do the
optimizers step (so DDP's one set of buckets serves VQ-GAN's generator and discriminator alike;
a group idle in a step must not have taken part in that step's forward pass). Rank 0 alone
writes checkpoints and logs; with FSDP the full training state is gathered to rank 0 and saved
in the same single file (see docs/distributed.md for why).

Every ``log_every`` steps the scalars (losses, the module's own logs, learning rate, steps per
second) go to the stage's loggers (``genfw.loggers``: ``log.jsonl`` unless the recipe's ``log:``
says otherwise); ``Trainer.loggers`` also takes images (``loggers.log_image(step, tag, image)``).

Everything needed to continue — weights, optimizers, schedulers, EMA, step, RNG states, the
position in the data — is saved without pickle in ``train_state.safetensors`` every
``checkpoint_every`` steps, at the end, and on Ctrl-C, SIGTERM or SIGUSR1 (what schedulers such as
Slurm and Kubernetes send before preempting a job); running again resumes, and on CPU with the
same seed the final weights equal those of an uninterrupted run bit for bit. Every
``snapshot_every`` steps a loadable model file, ``snapshot.safetensors`` (the EMA weights when
EMA is on), lets a run be sampled or evaluated while it trains.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from genfw import checkpoint, dist, io
from genfw.config import TrainSpec
from genfw.devices import autocast_context
from genfw.errors import CheckpointError, ConfigError, GenfwError, TrainingError, worker_message
from genfw.loggers import LoggerSet
from genfw.progress import progress_bar

STATE_FILE = "train_state.safetensors"
SNAPSHOT_FILE = "snapshot.safetensors"
# Signals that stop training after the current step, with the state saved (as Ctrl-C does).
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None))
                     if s is not None)


class ResumableBatches(torch.utils.data.Sampler):
    """Batches of indices of an endless shuffled stream, reproducible from any step.

    Epoch ``e`` is a permutation drawn from ``seed + e``; with several ranks each takes its
    slice of every global batch, so a distributed run sees the same data as a single process.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise TrainingError("cannot train on an empty dataset")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = max(1, n // batch_size)  # drop the ragged last batch

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) % 2**64)  # any 63-bit seed
            perm = torch.randperm(self.n, generator=g)
            if self.n < self.batch_size:  # tiny datasets: sample with repetition
                perm = perm.repeat(math.ceil(self.batch_size / self.n))
            for i in range(offset, self.per_epoch):
                batch = perm[i * self.batch_size : (i + 1) * self.batch_size]
                yield batch[self.rank :: self.world_size].tolist()
                step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62


def lr_lambda(spec: TrainSpec) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero at ``spec.steps``."""

    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "cosine":
            span = max(1, spec.steps - spec.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - spec.warmup_steps) / span)))
        return 1.0

    return f


def to_device(x: Any, device: torch.device) -> Any:
    """Move tensors inside nested lists/tuples/dicts to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


COMPILE_TARGETS = ("backbone", "encoder", "decoder")


def compile_for_training(module: nn.Module) -> list[str]:
    """``train.*.compile: true``: ``torch.compile`` the heavy submodules in place.

    The backbone of a prior, the encoder and decoder of a tokenizer (or the module's own forward
    when it has none of them). In place (``nn.Module.compile``), so parameter names and
    checkpoints are unchanged. Returns the names compiled.
    """
    names = [n for n in COMPILE_TARGETS if isinstance(getattr(module, n, None), nn.Module)]
    for name in names:
        getattr(module, name).compile()
    if not names:
        module.compile()
        names = ["forward"]
    return names


class Trainer:
    """Trains ``module`` on ``dataset`` according to ``spec``, checkpointing into ``out_dir``."""

    def __init__(
        self,
        module: nn.Module,
        dataset: torch.utils.data.Dataset,
        spec: TrainSpec,
        out_dir: str | os.PathLike,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        prepare: Callable[[Any], Any] = lambda batch: batch,
        collate_fn: Callable | None = None,
        description: str = "train",
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        log: list[Any] | None = None,
        every: list[tuple[int, Callable[[Trainer], None]]] | None = None,
    ) -> None:
        self.module, self.dataset, self.spec = module, dataset, spec
        self.out_dir, self.seed, self.device = os.fspath(out_dir), seed, torch.device(device)
        self.prepare, self.collate_fn, self.description, self.on_step = prepare, collate_fn, description, on_step
        self.every = [(n, fn) for n, fn in (every or []) if n]  # (period, fn(trainer)) on rank 0
        world = dist.world_size()
        if spec.batch_size % world:
            raise ConfigError(
                f"{description}: batch_size {spec.batch_size} is not divisible by the {world} processes of this "
                f"torchrun: every process must get an equal share of the global batch (use a multiple of {world})"
            )
        self.module.to(self.device)
        self.engine = spec.distributed if dist.is_initialized() else None
        self._plain_class = type(module)
        self.ema = (AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(spec.ema_decay), use_buffers=True)
                    if spec.ema_decay else None)
        if self.engine == "fsdp":
            groups = [k for k, v in module.param_groups().items() if v]
            if len(groups) > 1:
                raise ConfigError(f"{description}: distributed: fsdp trains modules with one optimizer group; this one "
                                  f"has {len(groups)} ({', '.join(groups)}): use distributed: ddp for this stage")
            dist.broadcast_module(self.module)  # every rank starts from rank 0's weights
            if self.ema is not None:
                dist.broadcast_module(self.ema.module)
                dist.fully_sharded(self.ema.module, self.device)
            dist.fully_sharded(self.module, self.device)
        self._step_fn: Callable[[Any, int], Any] = module.training_step  # (after sharding: FSDP wraps it)
        self.groups = {k: v for k, v in module.param_groups().items() if v}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for name, params in self.groups.items():
            opts = {"lr": spec.lr, "betas": spec.betas, "weight_decay": spec.weight_decay}
            opts.update(spec.groups.get(name, {}))
            self.optimizers[name] = torch.optim.AdamW(params, lr=opts["lr"], betas=tuple(opts["betas"]),
                                                      weight_decay=opts["weight_decay"])
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name], lr_lambda(spec))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and spec.precision == "fp16")
        if spec.compile:
            compile_for_training(module)
        if self.engine == "ddp":  # DDP broadcasts rank 0's weights as it wraps the module
            self._step_fn = dist.data_parallel(self.module, self.device)
        self.step = 0
        self._stop_requested = False
        # the recipe's `log:` entries (None: jsonl); rank 0 only, opened by fit()
        self.loggers = LoggerSet(log, self.out_dir, stage=os.path.basename(os.path.normpath(self.out_dir)))

    # -- state --------------------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.out_dir, STATE_FILE)

    def state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.engine == "fsdp":  # gathered to rank 0 (a collective), in the layout of one process
            model = dist.full_model_state(self.module)
            optimizers = {k: dist.full_optimizer_state(self.module, o) for k, o in self.optimizers.items()}
            ema = None
            if self.ema is not None:
                ema = {"n_averaged": self.ema.n_averaged.detach().cpu(),
                       **{f"module.{k}": v for k, v in dist.full_model_state(self.ema.module).items()}}
        else:
            model = self.module.state_dict()
            optimizers = {k: o.state_dict() for k, o in self.optimizers.items()}
            ema = self.ema.state_dict() if self.ema is not None else None
        return {
            "step": self.step,
            "model": model,
            "optimizers": optimizers,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema": ema,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
        }

    def save_state(self) -> None:
        """Write the training state atomically (rank 0 writes; with FSDP every rank must call)."""
        if self.engine == "fsdp":
            state = self.state()  # every rank takes part in gathering it
        elif not dist.is_main():
            return
        else:
            state = self.state()
        if not dist.is_main():
            return
        tree, tensors = checkpoint.pack(state, prefix="s")
        checkpoint.save_tensors(self.state_path, tensors, {"type": "train_state", "tree": tree,
                                                           "description": self.description})

    def load_state(self) -> bool:
        """Resume from ``train_state.safetensors`` if present; returns whether it did."""
        if not io.exists(self.state_path):
            return False
        fix = "move it aside to restart this stage from scratch (or restore a good copy)"
        try:
            tensors, meta = checkpoint.read(self.state_path)
        except CheckpointError as e:
            raise TrainingError(f"training state: {e}: {fix}") from None
        if meta.get("type") != "train_state":
            raise TrainingError(f"{self.state_path} is not a training state: {fix}")
        try:
            self._restore(checkpoint.unpack(meta["tree"], tensors))
        except TrainingError:
            raise
        except Exception as e:  # noqa: BLE001 - any inconsistency of a damaged or foreign file
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise TrainingError(f"{self.state_path} is corrupt or belongs to another model "
                                f"({type(e).__name__}: {first}): {fix}") from None
        return True

    def _restore(self, state: dict[str, Any]) -> None:
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TrainingError(f"{self.state_path} holds an invalid step {step!r}: move it aside to restart")
        for key, t in state["model"].items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainingError(f"{self.state_path}: weight '{key}' holds NaN/inf: the state is corrupt; move it "
                                    "aside to restart this stage from scratch")
        if self.engine == "fsdp":  # every rank read the full state; each keeps its shard
            dist.load_full_model_state(self.module, state["model"])
            for k, o in self.optimizers.items():
                dist.load_full_optimizer_state(self.module, o, state["optimizers"][k])
            if self.ema is not None and state.get("ema") is not None:
                ema = dict(state["ema"])
                self.ema.n_averaged.copy_(ema.pop("n_averaged"))
                dist.load_full_model_state(self.ema.module, {k[len("module."):]: v for k, v in ema.items()})
        else:
            self.module.load_state_dict(state["model"], strict=True)
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = step

    @property
    def snapshot_path(self) -> str:
        return os.path.join(self.out_dir, SNAPSHOT_FILE)

    def save_snapshot(self) -> None:
        """A loadable model file of the current weights (EMA when on), with its step (rank 0)."""
        module = self.final_module()  # with FSDP, a collective
        if dist.is_main():
            checkpoint.save(self.snapshot_path, module, extra={"step": self.step, "snapshot": True})

    def final_module(self) -> nn.Module:
        """The trained weights: the EMA copy when EMA is on, else the module itself.

        Before the EMA's first update (``ema_every`` not reached yet) its copy holds the initial
        weights: the module itself is returned then, as the first update would copy it. With FSDP
        (every rank must call it): an unsharded copy with the full weights, rebuilt from the
        component's params and construction arguments.
        """
        averaged = self.ema is not None and int(self.ema.n_averaged) > 0
        module = self.ema.module if averaged else self.module
        if self.engine != "fsdp":
            return module
        cached = getattr(self, "_unsharded", None)
        if cached is not None and cached[0] == self.step:
            return cached[1]
        state = dist.full_model_state(module, everywhere=True)
        with torch.random.fork_rng(devices=[]):  # building must not move the training RNG
            plain = self._plain_class(self.module.params, **self.module.construct)
        for k, v in vars(self.module).items():  # the registry's stamps (name, distribution, version)
            if k.startswith("_genfw"):
                setattr(plain, k, v)
        plain.load_state_dict(state, strict=True)
        plain.to(self.device).train(self.module.training)
        self._unsharded = (self.step, plain)
        return plain

    # -- loop ---------------------------------------------------------------------------------

    def _loader(self) -> Iterator[Any]:
        sampler = ResumableBatches(len(self.dataset), self.spec.batch_size, self.seed, self.step,
                                   dist.rank(), dist.world_size())
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.spec.num_workers,
                                             collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
                                             # its own generator: creating the iterator must not
                                             # consume the global RNG, or a resumed run diverges
                                             generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)

    def _train_step(self, batch: Any) -> dict[str, float]:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.spec.precision):
            out = self._step_fn(batch, self.step)
        logs = dict(out.logs)
        for name in self.groups:
            if name not in out.losses:
                continue
            loss = out.losses[name]
            if not torch.isfinite(loss.detach()).all():
                raise TrainingError(
                    f"{self.description}: loss '{name}' is {float(loss.detach())} at step {self.step}; "
                    f"stopped, the last good checkpoint ({self.state_path}) is kept — lower the learning "
                    "rate or enable grad_clip"
                )
            logs[f"loss/{name}"] = float(loss.detach())
        # Every group's backward first (DDP reduces each bucket as its gradients are ready, and
        # finishes once the last group's backward has run), then every optimizer steps.
        stepping = []
        for name, params in self.groups.items():
            loss = out.losses.get(name)
            if loss is not None and loss.requires_grad:
                # FSDP computes with unsharded copies of the parameters, not with `params`
                # themselves; its one group is every trainable parameter anyway
                inputs = None if self.engine == "fsdp" else params
                self.scaler.scale(loss).backward(inputs=inputs, retain_graph=True)
                stepping.append(name)
        for name, params in self.groups.items():
            opt = self.optimizers[name]
            if name in stepping:
                if self.spec.grad_clip:
                    self.scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(params, self.spec.grad_clip)
                    logs[f"grad_norm/{name}"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                self.scaler.step(opt)
            with warnings.catch_warnings():
                # a group idle this step (e.g. a discriminator before disc_start) still follows
                # the global schedule; PyTorch would warn that its optimizer did not step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                self.schedulers[name].step()
        self.scaler.update()
        return logs

    def _next_batch(self, data: Iterator[Any]) -> Any:
        """The next batch; a data error (e.g. a corrupt image) saves the state first, as Ctrl-C does."""
        try:
            return next(data)
        except GenfwError as e:
            self.save_state()
            raise type(e)(f"{self.description}: {worker_message(e)}; state saved at step {self.step} to "
                          f"{self.state_path}, fix the data and run the same command again to resume") from None

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_requested = True

    def fit(self) -> nn.Module:
        """Train to ``spec.steps`` (resuming if a state exists) and return the final module."""
        resumed = self.load_state()
        if self.step > self.spec.steps:
            raise ConfigError(
                f"{self.description}: the saved state ({self.state_path}) is at step {self.step}, beyond the "
                f"{self.spec.steps} steps asked for: ask for {self.step} or more, or train into another output directory"
            )
        if self.step >= self.spec.steps:
            return self.final_module()
        self.module.train()
        data = self._loader()
        previous = {}
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not in the main thread
            pass
        t0, last = time.perf_counter(), self.step
        # the first step this session may log: records at or after it from an earlier session
        # came after the saved state and are logged again; those before it are kept
        self.loggers.open(start_step=self.step + 1)
        try:
            with progress_bar(self.description, total=self.spec.steps, completed=self.step, unit="step") as bar:
                if resumed:
                    bar.note(f"resumed at step {self.step}")
                while self.step < self.spec.steps:
                    batch = to_device(self.prepare(self._next_batch(data)), self.device)
                    logs = self._train_step(batch)
                    self.step += 1
                    if self.ema is not None and self.step % self.spec.ema_every == 0:
                        self.ema.update_parameters(self.module)
                    if self.step % self.spec.log_every == 0 or self.step == self.spec.steps:
                        now = time.perf_counter()
                        logs["steps_per_s"] = (self.step - last) / max(now - t0, 1e-9)
                        logs["lr"] = self.schedulers[next(iter(self.schedulers))].get_last_lr()[0] if self.schedulers else 0.0
                        if len(self.schedulers) > 1:
                            logs.update({f"lr/{k}": sch.get_last_lr()[0] for k, sch in self.schedulers.items()})
                        t0, last = now, self.step
                        self.loggers.log_scalars(self.step, logs)
                        if self.on_step:
                            self.on_step(self.step, logs)
                    losses = {k: v for k, v in logs.items() if k.startswith("loss/")}
                    bar.update(self.step, **(losses or {"loss": float("nan")}))
                    if self.step % self.spec.checkpoint_every == 0 or self.step == self.spec.steps:
                        self.save_state()
                    if self.spec.snapshot_every and self.step % self.spec.snapshot_every == 0:
                        self.save_snapshot()
                    for period, fn in self.every:
                        if self.step % period == 0:
                            if self.engine == "fsdp":
                                self.final_module()  # gathered by every rank, cached for fn
                            if dist.is_main():
                                fn(self)
                    # Every rank stops at the same step. The signal handler only ever sets
                    # _stop_requested; the ranks' decision is kept apart from it, because a signal
                    # that lands during the collective would otherwise be overwritten by its result.
                    stop = dist.any_true(self._stop_requested) if dist.is_initialized() else self._stop_requested
                    if stop:
                        self._stop_requested = True
                        self.save_state()
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not self._stop_requested:  # Ctrl-C outside our handler (e.g. other thread)
                self.save_state()
            raise TrainingError(
                f"{self.description}: interrupted at step {self.step}; state saved to {self.state_path}, "
                "run the same command again to resume"
            ) from None
        finally:
            self.loggers.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.module.eval()
        return self.final_module()
