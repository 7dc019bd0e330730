"""The training loop every RadCLIP stage shares.

One `Trainer` runs: AdamW with L2 weight decay, a per-step cosine schedule from the base learning
rate (1e-4, optional linear warmup), optional gradient accumulation, validation loss after every
epoch, early stopping on it (patience), an atomic checkpoint every epoch (`checkpoints/last.pt`)
plus the best one (`checkpoints/best.pt`), and exact resume: model, optimizer, scheduler, epoch,
early-stopping state and RNG state are restored, and the data order of epoch e depends only on
(seed, e), so a run killed mid-epoch and resumed ends at the same weights as an uninterrupted one.
Every checkpoint records what the run was trained from (`origin`: the starting weights'
fingerprint, the manifests' contents, the settings that shape the weights; see
`stages.training_origin`), and a resume refuses, in one line that names the difference, to continue
from a checkpoint of other weights, data or settings, or from a damaged one.

Distributed: launched by torchrun, it uses torch.distributed (NCCL on GPUs, gloo on CPU), a
DistributedSampler, DDP for the trainable module, and losses that gather features over ranks
(`losses.info_nce`). Logs and checkpoints are written, and `TrainingHooks` called, by rank 0 only.
Nothing here prints: epochs and batch progress reach the caller through `TrainingHooks`.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .encoders import resolve_device
from .errors import RadCLIPError
from .fileutil import atomic_path, atomic_write_text
from .plotting import plot_loss_curves
from .settings import TrainConfig, default_workers, max_workers  # noqa: F401 (re-exported)

try:
    import resource  # peak memory; not on Windows
except ImportError:
    resource = None

CHECKPOINT_VERSION = 2  # 2: checkpoints record their origin


def _ignore(*_):
    pass


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory (MB) of this process and of its largest finished child (a data-loader
    worker; its pages shared with this process count in both), and the CUDA allocator's peak on a
    GPU; None where the platform cannot tell."""
    own = child = None
    try:  # Linux: this program's own peak (getrusage would report the launching process's if larger)
        status = Path("/proc/self/status").read_text()
        own = int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        if resource is not None:
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if resource is not None:
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": own, "peak_rss_worker_mb": child or None, "peak_cuda_mb": cuda}


@dataclass
class TrainingHooks:
    """What a run tells its caller while it runs, on rank 0 only; each hook is optional. The
    library never prints: the command layer turns these into lines and progress bars, and a
    notebook may pass its own hooks or none."""

    message: Callable[[str], None] = _ignore  # a one-line fact for the user ("manifest rows: ...")
    on_epoch: Callable[[dict], None] = _ignore  # each epoch's record, as written to epochs.jsonl
    progress: Callable[[str, int, int], None] = _ignore  # (what, batches done, batches in all)


# --------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_agree(self, value: float) -> float:
        """The mean of a float over ranks (so every rank takes the same decision)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.to(self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, out of its DistributedDataParallel wrapper when it has one."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def setup_distributed(device="auto") -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local_rank, torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


def teardown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- schedule, early stop
def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warmup, then cosine annealing from the base learning rate to 0, per optimizer step."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EarlyStopping:
    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True if it is the new best."""
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


# --------------------------------------------------------------------------- logging
class MetricsLog:
    """Per-step and per-epoch metrics as JSONL and CSV (+ TensorBoard when installed); rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, resume_at: tuple | None = None):
        """`resume_at` = (step, epoch) of the checkpoint resumed from: records after it are dropped
        (that part of the run is done again); None starts fresh logs."""
        self.out_dir, self.enabled = out_dir, enabled
        self.tb = None
        if not enabled:
            return
        for kind, keep in (("steps", lambda r: resume_at and r["step"] <= resume_at[0]),
                           ("epochs", lambda r: resume_at and r["epoch"] < resume_at[1])):
            path = out_dir / f"{kind}.jsonl"
            kept = [r for r in self.read(kind) if keep(r)] if path.exists() else []
            (out_dir / f"{kind}.csv").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            for record in kept:
                self.write(kind, record, tensorboard=False)
        try:  # after the rewrite above, so replayed records are not sent to TensorBoard twice
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def read(self, kind: str) -> list:
        path = self.out_dir / f"{kind}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def write(self, kind: str, record: dict, tensorboard=True):
        if not self.enabled:
            return
        with open(self.out_dir / f"{kind}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        path = self.out_dir / f"{kind}.csv"
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(record))
            if new:
                writer.writeheader()
            writer.writerow(record)
        if tensorboard and self.tb is not None:
            x = record.get("step", record.get("epoch"))
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{kind}/{k}", v, x)

    def close(self):
        if self.tb is not None:
            self.tb.close()

    def plot(self, path: Path, title: str):
        """PNG of the training (per step, smoothed) and validation (per epoch) loss curves."""
        if not self.enabled:
            return None
        try:
            return plot_loss_curves(self.read("steps"), self.read("epochs"), path, title)
        except RadCLIPError:  # matplotlib is optional
            return None


# --------------------------------------------------------------------------- checkpoints
class DamagedCheckpoint(RadCLIPError):
    pass


def read_checkpoint(path) -> dict:
    """A checkpoint's payload; DamagedCheckpoint, naming the file, if it is missing, empty, damaged
    (truncated) or not a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing")
    if path.stat().st_size == 0:
        raise DamagedCheckpoint(f"{path} is empty (0 bytes)")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        payload = None
    if not isinstance(payload, dict) or not {"version", "module", "epoch", "config"} <= set(payload):
        raise DamagedCheckpoint(f"{path} is damaged (truncated?) or not a training checkpoint")
    return payload


def _show(value) -> str:
    return "not set" if value is None else ("on" if value else "off") if isinstance(value, bool) else (
        repr(value) if isinstance(value, str) else str(value))


def _difference(key: str, old, new) -> str:
    """One line saying how a checkpoint's origin entry `key` differs from this run's."""
    if isinstance(old, dict) and isinstance(new, dict):
        sub = next(k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k))
        return _difference(f"{key} {sub}", old.get(sub), new.get(sub))

    def short(h):
        return f"{h[:12]}..." if isinstance(h, str) else "none"

    if key == "weights":
        return (f"the starting model differs from the checkpoint's (weights fingerprint {short(old)} vs "
                f"{short(new)}); use the same --model, or a new --output")
    if key.endswith(" contents"):
        flag = key.split()[0]
        return (f"the file given to {flag} differs from the one the checkpoint was trained on (contents "
                f"{short(old)} vs {short(new)}); use that file, or a new --output")
    return f"{key} was {_show(old)} in the checkpoint, now {_show(new)}"


def worker_message(exc: Exception) -> str:
    """A RadCLIPError raised in a data-loader worker reaches the training process with the worker's
    traceback in its message: its own one line, again."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.rsplit("Traceback (most recent call last):", 1)[-1]  # the worker's own exception, not a chained one
    return last.split(f"{type(exc).__module__}.{type(exc).__qualname__}: ", 1)[-1]


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Train `module` (its parameters with requires_grad) on `compute_loss(module, batch)`.

    `train_set`/`val_set` are map-style datasets, drawn by `sampler` (DistributedSampler, or a class
    with its arguments and contract: `shards.ShardSampler`); `collate` builds a batch. `started` is
    the clock (`time.perf_counter()`) when the run began, for the time to the first step (default:
    when the Trainer is made). The same loss runs on
    validation batches (in eval mode, no grad); without validation rows early stopping and the best
    epoch follow the training loss. `out_dir` receives checkpoints and logs. `origin` (JSON-like) says
    what the run was trained from; it is recorded in checkpoints and must match on resume. `hooks`
    hear of each epoch and batch (rank 0 only).
    """

    def __init__(self, module: torch.nn.Module, compute_loss: Callable, train_set: Dataset, val_set: Dataset | None,
                 collate: Callable, config: TrainConfig, out_dir, ctx: DistContext, hooks: TrainingHooks | None = None,
                 describe: dict | None = None, origin: dict | None = None, sampler=DistributedSampler,
                 started: float | None = None):
        config.check()
        self.started = time.perf_counter() if started is None else started
        self.first_step_s, self.train_s, self.samples = None, 0.0, 0  # throughput after the first step
        if config.batch_size % ctx.world:
            raise RadCLIPError(f"batch size {config.batch_size} is not divisible by the {ctx.world} processes")
        if len(train_set) == 0:
            raise RadCLIPError("no training samples")
        self.module, self.compute_loss, self.config, self.ctx = module, compute_loss, config, ctx
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.hooks = hooks if hooks is not None and ctx.main else TrainingHooks()
        self.describe = describe or {}
        self.origin = origin or {}
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        if not self.trainable:
            raise RadCLIPError("nothing to train: no parameter requires a gradient")
        local_batch = config.batch_size // ctx.world
        self.train_sampler = sampler(train_set, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=config.seed)
        pin = ctx.device.type == "cuda"
        self.train_loader = DataLoader(train_set, batch_size=local_batch, sampler=self.train_sampler,
                                       collate_fn=collate, num_workers=config.num_workers, pin_memory=pin)
        self.val_loader = None
        if val_set is not None and len(val_set):
            # one fixed, seeded shuffle (never set_epoch): validation batches mix labels, as a
            # contrastive loss needs, and are the same every epoch so losses compare
            val_sampler = sampler(val_set, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=config.seed + 1)
            self.val_loader = DataLoader(val_set, batch_size=local_batch, sampler=val_sampler, collate_fn=collate,
                                         num_workers=config.num_workers, pin_memory=pin)
        self.wrapped = DistributedDataParallel(module) if ctx.distributed else module
        # parameter groups: biases, norms and scalars without weight decay; a module may ask for a
        # multiple of the learning rate (`lr_scale` on its parameters: new heads next to a pretrained tower)
        groups = {}
        for p in self.trainable:
            key = (p.ndim >= 2, float(getattr(p, "lr_scale", 1.0)))
            groups.setdefault(key, []).append(p)
        self.optimizer = torch.optim.AdamW([{"params": ps, "weight_decay": config.weight_decay if decay else 0.0,
                                             "lr": config.lr * scale}
                                            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (
                                                not kv[0][0], kv[0][1]))], lr=config.lr)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.accum_steps)
        total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = cosine_schedule(self.optimizer, min(total_steps, config.max_steps or total_steps),
                                         config.warmup_steps)
        self.early = EarlyStopping(config.patience, config.min_delta)
        self.epoch = 0
        self.step = 0

    # ----------------------------------------------------------------- checkpoints
    def _trainable_state(self):
        names = {id(p): n for n, p in self.module.named_parameters()}
        state = self.module.state_dict()
        return {n: state[n].detach().cpu().clone() for n in (names[id(p)] for p in self.trainable)}

    def save_checkpoint(self, name: str):
        if not self.ctx.main:
            return
        payload = {
            "version": CHECKPOINT_VERSION,
            "module": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "early_stopping": asdict(self.early),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": asdict(self.config),
            "describe": self.describe,
            "origin": self.origin,
        }
        with atomic_path(self.ckpt_dir / name) as tmp:
            torch.save(payload, tmp)

    def check_checkpoint(self, payload: dict, path):
        """Refuse (one line naming the difference) a checkpoint of another version, schedule, origin
        or set of trainable weights than this run's."""
        version = payload["version"]
        if version != CHECKPOINT_VERSION:
            older = isinstance(version, int) and version < CHECKPOINT_VERSION
            raise RadCLIPError(f"cannot resume from {path}: it was written by "
                               + ("an older RadCLIPSlicer and does not record what the run was trained from"
                                  if older else "another version of RadCLIPSlicer") + "; use a new --output")
        for key, value in asdict(self.config).items():
            if key != "num_workers" and payload["config"].get(key) != value:
                raise RadCLIPError(f"cannot resume: --{key.replace('_', '-')} was {payload['config'].get(key)} "
                                   f"in the checkpoint, now {value}")
        recorded = payload.get("origin", {})
        for key in dict.fromkeys([*self.origin, *recorded]):
            if recorded.get(key) != self.origin.get(key):
                raise RadCLIPError("cannot resume: " + _difference(key, recorded.get(key), self.origin.get(key)))
        mine, theirs = self._trainable_state(), payload["module"]
        if set(mine) != set(theirs):
            odd = sorted(set(mine) ^ set(theirs))[:3]
            raise RadCLIPError(f"cannot resume from {path}: its trainable weights are not this run's ({odd})")
        for name, tensor in mine.items():
            if theirs[name].shape != tensor.shape:
                raise RadCLIPError(f"cannot resume from {path}: {name} has shape {tuple(theirs[name].shape)} there, "
                                   f"{tuple(tensor.shape)} now (a setting that shapes the weights changed)")

    def load_checkpoint(self, path) -> dict:
        payload = read_checkpoint(path)
        self.check_checkpoint(payload, path)
        self.module.load_state_dict(payload["module"], strict=False)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.early = EarlyStopping(**payload["early_stopping"])
        self.epoch, self.step = payload["epoch"] + 1, payload["step"]
        torch.set_rng_state(payload["rng"])
        if payload["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        return payload

    def resume(self):
        """Continue from checkpoints/last.pt (or best.pt when last.pt is damaged), after checking
        that best.pt holds the best epoch's weights, which the run exports at the end."""
        last, best = self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt"
        if not last.exists():
            raise RadCLIPError(f"nothing to resume: {last} does not exist")
        log = logging.getLogger("RadCLIPCore")
        try:
            payload = self.load_checkpoint(last)
        except DamagedCheckpoint as damaged:
            # best.pt holds the same full state (weights, optimizer, schedule, RNG, early stopping)
            # at an earlier epoch, and epoch e's data order depends only on (seed, e): resuming from
            # it trains the later epochs again and ends at the same weights; only time is lost
            if not best.is_file():
                raise RadCLIPError(f"cannot resume: {damaged}, and there is no best.pt to fall back on; "
                                   f"use a new --output") from None
            try:
                payload = self.load_checkpoint(best)
            except DamagedCheckpoint as also:
                raise RadCLIPError(f"cannot resume: {damaged}, and {also}; use a new --output") from None
            if self.ctx.main:
                log.warning(f"{damaged}; resuming from best.pt (epoch {payload['epoch'] + 1}) instead: the epochs "
                            f"after it are trained again")
        if self.early.best_epoch < 0:
            return
        try:
            self._best_payload()
        except DamagedCheckpoint as damaged:
            if payload["epoch"] != self.early.best_epoch:
                # exporting another epoch's weights would be a model that is not the best epoch's
                # while the card and summary say it is: refuse rather than export a wrong result
                raise RadCLIPError(f"cannot resume: {damaged}; it held the weights of the best epoch "
                                   f"({self.early.best_epoch + 1}), which the run exports at the end. Use a new "
                                   f"--output to train again") from None
            # the checkpoint resumed from is the best epoch's own state: best.pt is written again from it
            if self.ctx.main:
                log.warning(f"{damaged}; written again from last.pt, which holds the same (best) epoch")
                with atomic_path(best) as tmp:
                    torch.save(payload, tmp)

    def _best_payload(self) -> dict:
        path = self.ckpt_dir / "best.pt"
        payload = read_checkpoint(path)
        if payload["epoch"] != self.early.best_epoch:
            raise DamagedCheckpoint(f"{path} holds epoch {payload['epoch'] + 1}, not the best epoch "
                                    f"{self.early.best_epoch + 1}")
        self.check_checkpoint(payload, path)
        return payload

    def load_best(self):
        """Load the best epoch's weights (checkpoints/best.pt) into the module, for the export."""
        if self.early.best_epoch < 0:
            return
        try:
            payload = self._best_payload()
        except DamagedCheckpoint as damaged:
            raise RadCLIPError(f"cannot export the best epoch: {damaged}; use a new --output to train again") from None
        self.module.load_state_dict(payload["module"], strict=False)

    # ----------------------------------------------------------------- loop
    def _batches(self, loader, desc):
        total = len(loader)
        self.hooks.progress(desc, 0, total)
        batches = iter(loader)
        for done in range(1, total + 1):
            try:
                batch = next(batches)
            except RadCLIPError as exc:
                raise RadCLIPError(worker_message(exc)) from None
            except StopIteration:
                return
            yield batch
            self.hooks.progress(desc, done, total)

    def _run_loss(self, batch):
        return self.compute_loss(self.wrapped, batch)

    @torch.no_grad()
    def validate(self):
        if self.val_loader is None:
            return None
        self.module.eval()
        total, count = 0.0, 0
        for batch in self._batches(self.val_loader, "validation"):
            total += float(self._run_loss(batch))
            count += 1
        # every rank computed the global-batch loss; agree on the mean anyway (uneven tails). A last
        # batch of one pair has loss 0 every epoch: it scales the mean by a constant factor and does
        # not change which epoch is best (a validation set of one text is refused in `stages`)
        value = self.ctx.all_agree(total / max(count, 1))
        if not math.isfinite(value):
            raise RadCLIPError(f"the validation loss is {value} at epoch {self.epoch + 1}: the model diverged; "
                               f"lower --lr (now {self.config.lr}); the last good checkpoint is kept")
        return value

    def train_epoch(self, log: MetricsLog):
        self.module.train()
        self.train_sampler.set_epoch(self.epoch)
        if hasattr(self.train_loader.dataset, "set_epoch"):  # per-epoch augmentation, seeded
            self.train_loader.dataset.set_epoch(self.epoch)
        accum = self.config.accum_steps
        losses = []
        n = len(self.train_loader)
        self.optimizer.zero_grad(set_to_none=True)
        tick = time.perf_counter()
        for i, batch in enumerate(self._batches(self.train_loader, f"epoch {self.epoch + 1}/{self.config.epochs}")):
            last_micro = (i + 1) % accum == 0 or i + 1 == n
            sync = self.wrapped.no_sync() if (self.ctx.distributed and not last_micro) else nullcontext()
            with sync:
                loss = self._run_loss(batch)
                if not torch.isfinite(loss.detach()).all():
                    # never train on, or export, weights that a NaN/Inf has reached
                    raise RadCLIPError(f"training diverged: the loss is {float(loss.detach())} at epoch "
                                       f"{self.epoch + 1}, step {self.step + 1}; lower --lr (now {self.config.lr}) "
                                       "or check the data; the last good checkpoint is kept")
                (loss / accum).backward()
            losses.append(float(loss.detach()))
            if last_micro:
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                now = time.perf_counter()
                if self.first_step_s is None:
                    self.first_step_s = now - self.started
                else:  # steady state: the steps after the first (which waits for the workers to start)
                    self.train_s += now - tick
                    self.samples += len(batch[-1]) * self.ctx.world * min(accum, i + 1)
                tick = now
                log.write("steps", {"step": self.step, "epoch": self.epoch, "epoch_float": self.epoch + (i + 1) / n,
                                    "loss": float(sum(losses[-accum:]) / len(losses[-accum:])),
                                    "lr": float(self.scheduler.get_last_lr()[0])})
                if self.reached_max_steps:
                    break
        return sum(losses) / len(losses)

    @property
    def reached_max_steps(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def fit(self, resume: bool = False) -> dict:
        """Train until the last epoch or early stopping. Returns a summary dict."""
        if resume:
            self.resume()
        elif self.ctx.main and (self.ckpt_dir / "last.pt").exists():
            raise RadCLIPError(f"'{self.out_dir}' already holds a run; use --resume, or another output folder")
        self.ctx.barrier()
        if self.ctx.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir, self.ctx.main, (self.step, self.epoch) if resume else None)
        stopped_early = self.early.should_stop
        try:
            while self.epoch < self.config.epochs and not stopped_early and not self.reached_max_steps:
                started = time.perf_counter()
                train_loss = self.train_epoch(log)
                val_loss = self.validate()
                improved = self.early.update(val_loss if val_loss is not None else train_loss, self.epoch)
                record = {"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss,
                          "lr": float(self.scheduler.get_last_lr()[0]), "seconds": time.perf_counter() - started,
                          "best": improved}
                log.write("epochs", record)
                self.hooks.on_epoch(record)
                self.save_checkpoint("last.pt")
                if improved:
                    self.save_checkpoint("best.pt")
                stopped_early = self.early.should_stop
                self.epoch += 1
                self.ctx.barrier()
        finally:
            log.close()
        curve = log.plot(self.out_dir / "loss_curves.png", f"{self.describe.get('stage', 'training')} loss")
        monitor = "validation loss" if self.val_loader is not None else "training loss"
        speed = {"time_to_first_step_s": self.first_step_s,
                 "samples_per_second": self.samples / self.train_s if self.train_s > 0 else None,
                 "workers": self.config.num_workers, **peak_memory(self.ctx.device)}
        if self.ctx.main:
            atomic_write_text(self.out_dir / "summary.json", json.dumps({
                "epochs_run": self.epoch, "stopped_early": stopped_early, "best_epoch": self.early.best_epoch,
                "best_loss": self.early.best, "monitor": monitor, "steps": self.step,
                "reached_max_steps": self.reached_max_steps, **speed, **self.describe}, indent=2) + "\n")
        return {"stopped_early": stopped_early, "best_epoch": self.early.best_epoch, "best_loss": self.early.best,
                "monitor": monitor, "epochs_run": self.epoch, "loss_curves": str(curve) if curve else None,
                "steps": self.step, **speed}
