"""Class-conditional sampling on Fashion-MNIST, checked by a separately trained test classifier.

Needs a workdir with a trained score model (the main job: `python main.py --mode all --config
configs/fashion_mnist.py --workdir runs/fashion_mnist`). Then:
1. trains (or resumes) the noise-conditional WRN guidance classifier: `--mode train_classifier`;
2. samples `--per_class` images of every class with `--class_label all` at each --scales value
   (and unconditional samples as the chance baseline);
3. trains a test classifier of a different family (scikit-learn MLP on clean pixels, the full
   60,000 training images) and reports how often it agrees with the requested label.

    python benchmarks/class_conditional.py --workdir runs/fashion_mnist

Writes <workdir>/controllable/class_conditional.json and one PNG grid per scale (row = class).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from sgm_jax import datasets, io_utils  # noqa: E402
from sgm_jax.cli.sample import run_sample  # noqa: E402
from sgm_jax.cli.train_classifier import run_train_classifier  # noqa: E402


def train_test_classifier(config, seed: int = 0):
  """A scikit-learn MLP on clean training images in [0, 1]: (classifier, its test accuracy)."""
  from sklearn.neural_network import MLPClassifier
  spec = datasets.from_config(config)
  dataset = datasets.get_dataset(spec)
  train, test = dataset.source("train"), dataset.source("test")
  x_train, y_train = train.fetch(np.arange(len(train)))
  x_test, y_test = test.fetch(np.arange(len(test)))
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=30, early_stopping=True,
                      random_state=seed)
  start = time.time()
  clf.fit(flat(x_train), y_train)
  accuracy = float(np.mean(clf.predict(flat(x_test)) == y_test))
  print(f"test classifier: MLP(256) on {len(x_train)} clean images, test accuracy "
        f"{accuracy:.4f} ({time.time() - start:.0f} s)", flush=True)
  return clf, accuracy


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/fashion_mnist")
  parser.add_argument("--config", default="fashion_mnist", help="module name under configs/")
  parser.add_argument("--per_class", type=int, default=10)
  parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 4.0, 8.0])
  parser.add_argument("--sampler", default="pc")
  parser.add_argument("--num_steps", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=None,
                      help="samples per sampler call (default: all 10 x per_class at once)")
  args = parser.parse_args()

  config = importlib.import_module(f"configs.{args.config}").get_config()
  centered = bool(config.data.centered)
  classifier_metrics = run_train_classifier(config, args.workdir)
  print(f"guidance classifier: {json.dumps(classifier_metrics)}", flush=True)
  test_clf, test_accuracy = train_test_classifier(config)
  num_classes = int(config.classifier.num_classes)
  n = num_classes * args.per_class
  config.sampling.batch_size = args.batch_size or n

  def predict(samples):
    x01 = np.clip((samples + 1.0) / 2.0 if centered else samples, 0.0, 1.0)
    return test_clf.predict(x01.reshape(len(x01), -1))

  def agreement(samples, labels):
    pred = predict(samples)
    per_class = [float(np.mean(pred[labels == k] == k)) for k in range(num_classes)]
    return float(np.mean(pred == labels)), per_class

  report = dict(sampler=args.sampler, num_steps=args.num_steps, samples=n,
                guidance_classifier=classifier_metrics, test_classifier_accuracy=test_accuracy,
                runs=[])
  start = time.time()
  plain = run_sample(config, args.workdir, args.sampler, args.num_steps, n)
  with np.load(plain["npz"]) as f:
    pred = predict(f["samples"])
  histogram = np.bincount(pred, minlength=num_classes) / n
  # Chance level of "agrees with a requested label" when labels cycle uniformly: 1 / num_classes.
  report["unconditional"] = dict(predicted_class_histogram=histogram.tolist(),
                                 chance_agreement=1.0 / num_classes,
                                 seconds=time.time() - start)
  print(f"unconditional: predicted classes {np.round(histogram, 3).tolist()}", flush=True)
  for scale in args.scales:
    start = time.time()
    result = run_sample(config, args.workdir, args.sampler, args.num_steps, n,
                        class_label="all", classifier_scale=scale)
    with np.load(result["npz"]) as f:
      samples = f["samples"]
    labels = np.asarray(result["labels"])
    agree, per_class = agreement(samples, labels)
    order = np.argsort(labels, kind="stable")  # one row per class
    png = os.path.join(args.workdir, "controllable", f"class_conditional_scale{scale:g}.png")
    io_utils.save_image_grid(samples[order], png, nrow=args.per_class,
                             data_range=(-1.0, 1.0) if centered else (0.0, 1.0), upscale=2)
    run = dict(scale=scale, agreement=agree, per_class=per_class, png=png,
               seconds=time.time() - start, nfe=result["nfe"])
    report["runs"].append(run)
    print(f"scale {scale:g}: test classifier agrees with the requested label for "
          f"{agree:.3f} of {n} samples (chance {1 / num_classes:.2f}); per class "
          f"{np.round(per_class, 2).tolist()}; {png}", flush=True)
  path = os.path.join(args.workdir, "controllable", "class_conditional.json")
  with io_utils.atomic_write(path, "w") as f:
    json.dump(report, f, indent=1)
  print(f"written {path}")


if __name__ == "__main__":
  main()
