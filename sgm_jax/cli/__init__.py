"""The command line's edge, in one-directional layers (main.py imports the modes).

- `setup`: a ConfigDict becomes typed objects (SDE, model, dataset, loss, optimizer, loop spec,
  sampler options) and a checkpoint becomes EMA parameters and a score_fn;
- `classifier`: the same for the noise-conditional classifier of `config.classifier`;
- `outputs`: files that several modes write (samples, per-batch progress, the out-of-range share);
- one module per mode: `train`, `sample` (with the sampler comparison of --mode all), `evaluate`,
  `train_classifier`, `controllable` (inpaint, colorize, interpolate).

A mode imports `setup`, `classifier` and `outputs`, never another mode
(tests/test_architecture.py checks it, and that no module of sgm_jax imports itself back).
"""
