"""`main.py --mode train`: train a config's score network in a workdir, or resume it there."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from sgm_jax import parallel, train
from sgm_jax.cli import setup
from sgm_jax.workdir import WorkdirLock, check_or_record_config


def run_train(config: Any, workdir: str) -> train.TrainState:
  """Train (or resume training) in `workdir`; returns the final train state. With several
  processes (main.py's --coordinator_address ...), every process of the job calls it."""
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    sde, model, dataset = setup.build(config)
    spec = setup.loop_spec_from_config(config)
    opt = setup.optimizer_from_config(config)
    tx = opt.build()
    example_shape = dataset.train_batch(0)["image"].shape[1:]
    # The fresh state is computed only where there is no checkpoint to resume from (its
    # initializers' compile is seconds for the paper networks); shapes are all the rest needs.
    state = setup.abstract_initial_state(config, model, example_shape, tx)
    # Recorded only once the config has proven buildable, so a failed first run leaves the
    # workdir free for the corrected config.
    check_or_record_config(workdir, config, record=parallel.is_first_process())
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    logging.info("model %s with %d parameters; %s; data %s %s", config.model.name, n_params,
                 type(sde).__name__, config.data.dataset, example_shape)
    step_fn = train.make_train_step(setup.loss_fn_from_config(config, sde, model), tx,
                                    float(config.model.ema_rate), int(config.seed),
                                    opt.schedule())
    return train.train_loop(
        workdir, state, step_fn, dataset.batches_fn(), spec, opt.schedule(),
        fresh_state=lambda: setup.initial_state(config, model, example_shape, tx))
