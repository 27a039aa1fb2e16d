"""Train state (params, EMA, optimizer), the pure train step, and the preemption-safe train loop.

The step is written for one device and one example's loss (vmapped over the batch); parallel.py
runs it on every device of every process. Randomness is folded, not threaded: the key of example
i at step s is fold_in(fold_in(PRNGKey(seed), s), global index of i), so a resumed run, and a run
over a different number of devices or processes with the same global batch, draws exactly the
same noise.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgm_jax import parallel
from sgm_jax.checkpoints import CheckpointStore
from sgm_jax.errors import InputError, TrainingDiverged

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  params_ema: Any
  opt_state: Any


# Learning-rate decays from the peak rate to 0 over a number of steps.
DECAYS = {
    "none": None,
    "cosine": lambda lr, steps: optax.cosine_decay_schedule(lr, steps),
    "linear": lambda lr, steps: optax.linear_schedule(lr, 0.0, steps),
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Adam with linear warm-up and global-norm clipping (score_sde's defaults), and optionally the
  rate decayed to 0 at step `decay_steps` after the warm-up ('cosine' or 'linear'; 'none':
  constant, score_sde's)."""

  lr: float = 2e-4
  warmup: int = 5000
  grad_clip: float = 1.0
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay: str = "none"
  decay_steps: int = 0

  def __post_init__(self):
    if not self.lr > 0:
      raise InputError(f"optim.lr must be > 0, got {self.lr!r}")
    if self.warmup < 0:
      raise InputError(f"optim.warmup must be >= 0, got {self.warmup!r}")
    if self.decay not in DECAYS:
      raise InputError(f"optim.decay must be one of {list(DECAYS)}, got {self.decay!r}")
    if self.decay != "none" and not self.decay_steps > self.warmup:
      raise InputError(f"a learning-rate decay needs more steps ({self.decay_steps}, "
                       f"training.n_iters) than the warm-up ({self.warmup}, optim.warmup)")

  def schedule(self) -> optax.Schedule:
    rise = optax.linear_schedule(0.0, self.lr, self.warmup) if self.warmup else None
    if self.decay == "none":
      return rise or optax.constant_schedule(self.lr)
    fall = DECAYS[self.decay](self.lr, self.decay_steps - self.warmup)
    return optax.join_schedules([rise, fall], [self.warmup]) if rise else fall

  def build(self) -> optax.GradientTransformation:
    """Clipping (none when grad_clip is negative or None: a bound of +inf, which changes no
    update), then AdamW. The optimizer state has the same tree with and without clipping, so a
    run resumes after grad_clip changes."""
    clip = self.grad_clip if self.grad_clip is not None and self.grad_clip >= 0 else math.inf
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(self.schedule(), b1=self.beta1, b2=self.beta2, eps=self.eps,
                                   weight_decay=self.weight_decay))


def init_params(model: nn.Module, key: Array, input_shape: tuple) -> Any:
  """Initial parameters for inputs of `input_shape` (B, ...) and (B,) time labels."""
  k_params, k_dropout = jax.random.split(key)
  x = jnp.zeros(input_shape, jnp.float32)
  t = jnp.ones((input_shape[0],), jnp.float32)
  return model.init({"params": k_params, "dropout": k_dropout}, x, t)["params"]


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    params_ema=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params))


# The initial state is computed once: XLA's backend optimizations only cost compile time there
# (23 s vs 2.5 s for the Fashion-MNIST U-Net's initializers on a loaded 2-core CPU; the values
# differ from an optimized compile in the last bit of ~1% of the weights).
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_train_state(model: nn.Module, key: Array, input_shape: tuple,
                     tx: optax.GradientTransformation) -> TrainState:
  """The train state at step 0 (init_params, EMA copy, optimizer state) as one jitted program,
  compiled without backend optimizations (run op by op, model.init dispatches and compiles every
  initializer separately: 18-29 s for the Fashion-MNIST U-Net on a loaded machine)."""
  input_shape = tuple(int(d) for d in input_shape)
  init = jax.jit(lambda k: create_train_state(init_params(model, k, input_shape), tx),
                 compiler_options=_INIT_COMPILER_OPTIONS)
  return init(key)


def abstract_train_state(model: nn.Module, input_shape: tuple,
                         tx: optax.GradientTransformation) -> TrainState:
  """init_train_state's structure, shapes and dtypes as jax.ShapeDtypeStruct leaves, e.g. as a
  checkpoint restore target: the network is traced (jax.eval_shape), never run, and no array is
  allocated."""
  input_shape = tuple(int(d) for d in input_shape)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return jax.eval_shape(lambda k: create_train_state(init_params(model, k, input_shape), tx), key)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_rate: float,
                    seed: int, schedule: Optional[optax.Schedule] = None) -> Callable:
  """step(state, batch) -> (state, metrics) for one device, to run under parallel.fused_steps.

  loss_fn(params, x, key) is a batch loss; it is applied to each example with its own key and
  averaged, then gradients are averaged over devices.
  """
  base_key = jax.random.PRNGKey(seed)

  def step(state: TrainState, batch: Array):
    step_key = jax.random.fold_in(base_key, state.step)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
        step_key, parallel.global_example_index(batch.shape[0]))

    def mean_loss(params):
      per_example = jax.vmap(lambda x, k: loss_fn(params, x[None], k))(batch, keys)
      return jnp.mean(per_example)

    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    loss, grads = parallel.pmean((loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params_ema = jax.tree_util.tree_map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p,
                                        state.params_ema, params)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    metrics = {"loss": loss, "grad_norm": grad_norm}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, params_ema=params_ema,
                              opt_state=opt_state)
    return new_state, metrics

  return step


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """How long to train and how often to log and checkpoint."""

  n_iters: int
  batch_size: int
  n_jitted_steps: int = 1
  log_freq: int = 50
  snapshot_freq: int = 10000
  snapshot_freq_for_preemption: int = 1000
  keep_checkpoints: int = 5
  max_seconds: Optional[float] = None
  seed: int = 42

  def __post_init__(self):
    for name in ("n_iters", "batch_size", "n_jitted_steps", "log_freq", "snapshot_freq",
                 "snapshot_freq_for_preemption", "keep_checkpoints"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"training.{name} must be a positive integer, got {value!r}")
    for name in ("snapshot_freq", "snapshot_freq_for_preemption"):
      if getattr(self, name) % self.n_jitted_steps:
        raise InputError(f"training.{name}={getattr(self, name)} must be a multiple of "
                         f"training.n_jitted_steps={self.n_jitted_steps}")
    if self.max_seconds is not None and not self.max_seconds > 0:
      raise InputError(f"training.max_seconds must be > 0 or None, got {self.max_seconds!r}")


LOSS_LOG = "train_log.csv"


class _LossLog:
  """Append-only CSV of (step, loss, lr) that survives restarts (rows past the resume step are
  dropped, so a resumed run's log equals an uninterrupted one's) and crashes (a torn row left by
  a run killed mid-append is dropped with a warning). Lines starting with '#' are notes (where
  an imported run came from, `note_in_loss_log`), kept where they stand."""

  HEADER = "step,loss,lr\n"

  def __init__(self, path: str, resume_step: int):
    self.path = path
    lines = [r if isinstance(r, str) else ",".join(r) for r in self._rows(path, notes=True)
             if isinstance(r, str) or int(r[0]) <= resume_step]
    from sgm_jax.io_utils import atomic_write
    with atomic_write(path, "w") as f:
      f.write(self.HEADER + "".join(line + "\n" for line in lines))
    self._file = open(path, "a")

  @staticmethod
  def _rows(path: str, notes: bool = False) -> list:
    """The whole (step, loss, lr) rows of the log at `path`, as written; torn ones are dropped.
    With `notes`, the '#' note lines too (as strings), in file order."""
    if not os.path.exists(path):
      return []
    with open(path) as f:
      text = f.read()
    lines = text.split("\n")
    rows, dropped = [], []
    if lines[-1]:  # no final newline: the last row was cut short
      dropped.append(lines[-1])
    for line in lines[1:-1]:
      if line.startswith("#"):
        if notes:
          rows.append(line)
        continue
      fields = line.split(",")
      try:
        if len(fields) != 3:
          raise ValueError
        int(fields[0]), float(fields[1]), float(fields[2])
      except ValueError:
        dropped.append(line)
        continue
      rows.append(tuple(fields))
    if dropped:
      logging.warning("%s: dropping %d torn row(s) %s (a run was killed mid-write)", path,
                      len(dropped), ", ".join(repr(d[:40]) for d in dropped[:3]))
    return rows

  def append(self, step: int, loss: float, lr: float) -> None:
    self._file.write(f"{int(step)},{float(loss)!r},{float(lr)!r}\n")  # one write: no half rows
    self._file.flush()

  def read(self) -> tuple[np.ndarray, np.ndarray]:
    rows = self._rows(self.path)
    return (np.array([int(r[0]) for r in rows], np.int64),
            np.array([float(r[1]) for r in rows], np.float64))

  def close(self):
    self._file.close()


def note_in_loss_log(workdir: str, note: str) -> str:
  """Append '# note' to the workdir's loss log (train_log.csv), e.g. where an imported run came
  from; the log keeps it when training resumes."""
  from sgm_jax.io_utils import atomic_write
  path = os.path.join(workdir, LOSS_LOG)
  text = _LossLog.HEADER
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  note = " ".join(str(note).split())  # one line
  with atomic_write(path, "w") as f:
    f.write(text + ("" if text.endswith("\n") else "\n") + f"# {note}\n")
  return path


def plot_loss_curve(steps: np.ndarray, losses: np.ndarray, path: str) -> str:
  """Write the training loss curve as a PNG (atomically)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sgm_jax.io_utils import atomic_write
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  if len(steps):
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(steps) >= 10:
      k = max(len(steps) // 20, 2)
      smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
      ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"moving average ({k})")
    ax.set_yscale("log" if np.all(losses > 0) else "linear")
    ax.legend()
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with atomic_write(path) as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path


def _expected_end_step(step: int, n_iters: int, steps_per_call: int,
                       max_seconds: Optional[float], elapsed: float, rate: float) -> int:
  """The step training will stop at: n_iters, or the step where `max_seconds` run out when
  `elapsed` of them are spent at `step` and it goes on at `rate` steps/s (each device call of
  `steps_per_call` steps that starts in time runs to its end)."""
  if max_seconds is None or not rate > 0:
    return n_iters
  calls = math.ceil(max(max_seconds - elapsed, 0.0) * rate / steps_per_call)
  return int(min(n_iters, step + calls * steps_per_call))


def train_loop(workdir: str, state: TrainState, step_fn: Callable,
               batches: Callable[[int], Iterator[np.ndarray]], spec: LoopSpec,
               schedule: Optional[optax.Schedule] = None,
               stats: Optional[dict] = None,
               fresh_state: Optional[Callable[[], TrainState]] = None) -> TrainState:
  """Run (and resume) training in `workdir` on every device of every process; returns the final
  state as host arrays.

  A checkpoint in `workdir` is restored into `state`'s structure, shapes and dtypes; `state` may
  then be abstract (jax.ShapeDtypeStruct leaves, abstract_train_state) if `fresh_state()` gives
  the state to start from where there is none: a resumed run never computes a fresh state.

  If `stats` is a dict it receives the wall time and number of steps after the first (compiling)
  device call until the last step has run, before the final checkpoint ('steady_seconds',
  'steady_steps'), the final checkpoint's save ('final_checkpoint_seconds') and the fetch of the
  final state ('to_host_seconds').

  `batches(start_step)` yields this process's (batch_size / process_count, ...) block of the
  training batches from `start_step` on, the same ones an uninterrupted run would see there.
  Checkpoints: a preemption snapshot every `snapshot_freq_for_preemption` steps and a kept
  checkpoint every `snapshot_freq` steps and at the end. Losses stay on the devices until a log or
  checkpoint step; a NaN/Inf loss among them stops training with TrainingDiverged and saves
  nothing. With several processes every stop (time limit, NaN) is decided by all of them together,
  and only process 0 writes the loss log, TensorBoard events and the loss curve.
  """
  from tqdm import tqdm
  parallel.check_divisible(spec.batch_size, "training.batch_size")
  first = parallel.is_first_process()
  store = CheckpointStore(workdir, keep=spec.keep_checkpoints, writer=True)
  try:
    resumed = store.latest_step() is not None
    if resumed:  # the newest readable checkpoint; a damaged newer one is replaced when saved again
      replicated = parallel.replicated()
      rstate = store.restore(jax.tree_util.tree_map(  # global arrays of a replicated sharding
          lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), state))
      logging.info("resumed from step %d", int(parallel.to_host(rstate.step)))
    else:  # a new copy: the caller's `state` survives donation
      rstate = parallel.replicate(state if fresh_state is None else fresh_state())
    del state
    start = int(parallel.to_host(rstate.step))
    loss_log = _LossLog(os.path.join(workdir, LOSS_LOG), start) if first else None
    writer = _summary_writer(workdir)
    p_step = parallel.fused_steps(step_fn)
    data = batches(start)
    step, t0, last_good = start, time.time(), (start if resumed else None)
    first_call_done, first_call_step = None, start
    pending = []  # (first step, metrics on the devices) of the calls not yet looked at
    # With a time limit the bar's total is the step where it runs out, so its ETA is honest.
    desc = "train" if spec.max_seconds is None else (
        f"train (stops after {tqdm.format_interval(spec.max_seconds)})")
    bar = tqdm(total=spec.n_iters, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               mininterval=2.0, disable=not first)

    def look_at_losses():
      """Fetch the pending losses: log them, and stop on NaN/Inf (all processes alike)."""
      if not pending:
        return
      fetched = parallel.to_host([m for _, m in pending])
      at = np.concatenate([s + 1 + np.arange(len(m["loss"]))  # the step each loss ends at
                           for (s, _), m in zip(pending, fetched)])
      pending.clear()
      losses = np.concatenate([np.asarray(m["loss"]) for m in fetched])
      lrs = (np.concatenate([np.asarray(m["lr"]) for m in fetched]) if "lr" in fetched[0]
             else np.zeros(len(losses)))
      finite = np.isfinite(losses)
      if parallel.any_process(not finite.all()):
        shown, bad = "NaN/Inf", ""
        if not finite.all():
          shown, bad = losses[~finite][0], f" at step {at[np.argmin(finite)] - 1}"
        raise TrainingDiverged(
            f"training loss became {shown}{bad}; stopped without saving. The last good checkpoint "
            f"({'none' if last_good is None else f'step {last_good}'}) in {workdir} is intact.")
      for s, loss, lr in zip(at, losses, lrs):
        if s % spec.log_freq == 0 or s == spec.n_iters:
          if loss_log is not None:
            loss_log.append(s, float(loss), float(lr))
          if writer is not None:
            writer.add_scalar("loss", float(loss), s)
            writer.add_scalar("lr", float(lr), s)
      bar.set_postfix(loss=f"{float(losses[-1]):.4g}", refresh=False)

    if stats is not None:  # a dict of an earlier run: its numbers are not this run's
      for name in ("steady_seconds", "steady_steps", "final_checkpoint_seconds", "to_host_seconds"):
        stats.pop(name, None)

    def stop_steady_clock():
      """stats' steady rate: until the last step has run (once)."""
      if stats is not None and first_call_done is not None and "steady_seconds" not in stats:
        jax.block_until_ready(rstate)
        stats.update(steady_seconds=time.time() - first_call_done,
                     steady_steps=step - first_call_step)

    while step < spec.n_iters:
      n = min(spec.n_jitted_steps, spec.n_iters - step)
      host = np.stack([next(data) for _ in range(n)])            # (n, local_batch, ...)
      rstate, metrics = p_step(rstate, parallel.from_process_batches(host, axis=1))
      pending.append((step, metrics))
      if first_call_done is None:  # the steady rate starts once the compiling call has run
        jax.block_until_ready(metrics)
        first_call_done, first_call_step = time.time(), step + n
      logs = (step + n) // spec.log_freq > step // spec.log_freq or step + n == spec.n_iters
      step += n
      if spec.max_seconds is not None:  # rate after the first (compiling) call once known
        since_step, since = ((first_call_step, first_call_done) if step > first_call_step
                             else (start, t0))
        now = time.time()
        bar.total = _expected_end_step(step, spec.n_iters, spec.n_jitted_steps, spec.max_seconds,
                                       now - t0, (step - since_step) / max(now - since, 1e-9))
      bar.update(n)
      out_of_time = spec.max_seconds is not None and parallel.any_process(
          time.time() - t0 >= spec.max_seconds)
      kind = ("periodic" if step % spec.snapshot_freq == 0 or step == spec.n_iters or out_of_time
              else "snapshot" if step % spec.snapshot_freq_for_preemption == 0 else None)
      if logs or kind is not None:
        look_at_losses()  # before a save: never checkpoint a diverged state
      if kind is not None:
        if step >= spec.n_iters or out_of_time:
          stop_steady_clock()
        save_start = time.time()
        store.save(step, rstate, kind=kind)
        last_good = step
        if stats is not None and "steady_seconds" in stats:
          stats.update(final_checkpoint_seconds=time.time() - save_start)
      if out_of_time:
        logging.info("stopping after %.0f s (training.max_seconds) at step %d", time.time() - t0,
                     step)
        break
    look_at_losses()
    stop_steady_clock()
    bar.total = step  # stopped by the time limit: done, not short of n_iters
    bar.close()
    fetch_start = time.time()
    state = parallel.to_host(rstate)
    if stats is not None:
      stats.update(to_host_seconds=time.time() - fetch_start)
    if writer is not None:
      writer.close()
    if loss_log is not None:
      loss_log.close()
      plot_loss_curve(*loss_log.read(), os.path.join(workdir, "loss_curve.png"))
    return state
  finally:
    store.close()


def _summary_writer(workdir: str):
  """TensorBoard event files under workdir/tensorboard (tensorboardX), on the first host only."""
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tensorboard"))
