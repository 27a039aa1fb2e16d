"""sgm-jax command line: python main.py --mode MODE --config configs/<name>.py --workdir DIR

Modes: train (resumes when the workdir has checkpoints), sample (PNG grid + .npz from the EMA
parameters), eval (what config.eval enables of the test loss, bits/dim, the denoising error and
FD-EffNet or FID, appended to workdir/eval/results.jsonl; resumable), all (train, sample with
DEIS-10, DPM-Solver-10, DDIM-50, the adaptive ODE and PC-500, then eval: the main job).
score_sde's checkpoints: import (--checkpoint FILE_OR_FOLDER [--classifier]) writes a workdir that
every mode accepts as if it had trained there (see sgm_jax/cli/import_checkpoint.py).
Controllable generation: train_classifier (the noise-conditional classifier, then
--mode sample --class_label 3|all [--classifier_scale 2]), inpaint (--mask right|left|top|bottom|
center|random|FILE.png), colorize (RGB models), interpolate (--num_points); their inputs come from
--input (an .npz with 'images', or an image file) or the test split, and --sampler picks the method
(any sampler; ode with a fixed-step solver). Results go to workdir/controllable/ (PNG, .npz, .json).
Config fields can be overridden on the command line, e.g. --config.training.batch_size=32.
Several processes (train, sample): the same command in each with --coordinator_address HOST:PORT
--num_processes N --process_id I, or --distributed auto where JAX finds the cluster (TPU pods).
Sampler options: --sampler deis --num_steps 10 --sampler_option order=2 ..., or --nfe 5 (the best
sampler for 5 score evaluations per sample; for 3-26 on a time grid fitted to the checkpoint, tuned
on first use and kept in the workdir: --sampler_option time_grid=tuned does that for any
fixed-grid sampler).
Log lines: --verbosity=-1 (warnings only), 0 (default: sgm-jax's progress), 1 (libraries' too).
Errors: a mistake in the input is one line `error: ...` (exit code 2); a fault shows its
traceback (exit code 1).
"""
import json
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "all", "train_classifier", "inpaint", "colorize",
         "interpolate", "import")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, samples).")
flags.DEFINE_enum("mode", None, list(MODES), "What to run.")
flags.DEFINE_string("sampler", None, "sample/eval: sampler name (default: from the config).")
flags.DEFINE_integer("num_steps", None, "sample/eval: number of sampler steps.")
flags.DEFINE_integer("nfe", None, "sample/eval: a budget of score evaluations per sample: without "
                     "--sampler the best sampler for it (README, 'Samplers by budget'; 3-26 tune "
                     "a time grid for the checkpoint on first use, minutes), with one its most "
                     "steps that fit; instead of --num_steps.")
flags.DEFINE_integer("num_samples", None, "sample/eval: number of samples; inpaint/colorize: "
                     "number of images (default 8); interpolate: number of pairs (default 4).")
flags.DEFINE_integer("checkpoint_step", None, "sample/eval: checkpoint step (default latest).")
flags.DEFINE_multi_string("sampler_option", [], "sample/eval/inpaint/colorize: KEY=VALUE "
                          "sampler option (JSON or Python values, e.g. order=2, snr=0.16, "
                          "denoise=False); replaces that one option of the config's.")
flags.DEFINE_string("class_label", None, "--mode sample: class to sample (an integer, or 'all' "
                    "to cycle through the classes); needs --mode train_classifier first.")
flags.DEFINE_float("classifier_scale", None, "--mode sample --class_label: classifier weight "
                   "(default config.classifier.scale).")
flags.DEFINE_string("input", None, "inpaint/colorize/interpolate: input images (.npz with "
                    "'images', or an image file); default: the test split.")
flags.DEFINE_string("mask", "right", "--mode inpaint: region to fill in (left, right, top, "
                    "bottom, center, random) or a mask image (white = known).")
flags.DEFINE_integer("num_points", 8, "--mode interpolate: images per interpolation path.")
flags.DEFINE_string("checkpoint", None, "--mode import: a score_sde checkpoint (a checkpoint_<n> "
                    "file, its checkpoints/ folder for the newest, checkpoints-meta/checkpoint for "
                    "the preemption snapshot, or its workdir).")
flags.DEFINE_bool("classifier", False, "--mode import: --checkpoint is score_sde's noise-"
                  "conditional classifier (for --mode sample --class_label).")
flags.DEFINE_string("coordinator_address", None, "Several processes (jax.distributed): HOST:PORT "
                    "of process 0, the same for every process of the job.")
flags.DEFINE_integer("num_processes", None, "Several processes: how many the job has.")
flags.DEFINE_integer("process_id", None, "Several processes: this one's index, 0 .. "
                     "num_processes - 1 (process 0 writes the files).")
flags.DEFINE_enum("distributed", "flags", ["flags", "auto"], "flags: start jax.distributed when "
                  "--coordinator_address/--num_processes/--process_id are given; auto: always, "
                  "with JAX detecting what they leave out (TPU pods, SLURM, Open MPI).")
flags.mark_flags_as_required(["config", "workdir", "mode"])

# Modes that split their work over the processes of a job; the others run on one process.
MULTI_PROCESS_MODES = ("train", "sample", "eval")


PYTHON_CONSTANTS = {"True": True, "False": False, "None": None}


def _parse_options(items):
  """KEY=VALUE strings -> {KEY: value}: JSON values (2, 0.16, true, "x", [1, 2]), Python's True,
  False and None, anything else as a string."""
  from sgm_jax.errors import InputError
  options = {}
  for item in items:
    if "=" not in item:
      raise InputError(f"--sampler_option must look like KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    if value in PYTHON_CONSTANTS:
      options[key] = PYTHON_CONSTANTS[value]
      continue
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
  return options


class _ProjectRecords(logging.Filter):
  """Passes sgm-jax's own records and every library's warnings and errors; keeps out the
  libraries' INFO lines (Orbax writes hundreds per training run)."""

  def filter(self, record):
    return (record.levelno >= logging.WARNING or record.name in ("root", "__main__")
            or record.name.startswith("sgm_jax"))


def _configure_logging():
  """--verbosity (absl's flag): -1 warnings and errors only; 0 (default) also sgm-jax's progress
  lines; 1 everything, the libraries' INFO and DEBUG lines included."""
  root = logging.getLogger()
  if FLAGS.verbosity >= 1:
    root.setLevel(logging.DEBUG)
    return
  root.setLevel(logging.INFO if FLAGS.verbosity == 0 else logging.WARNING)
  for handler in root.handlers:
    handler.addFilter(_ProjectRecords())


def main(argv):
  del argv
  _configure_logging()
  _initialize_distributed()
  from sgm_jax.cli import evaluate, sample, train, train_classifier
  config, workdir = FLAGS.config, FLAGS.workdir
  mode = FLAGS.mode
  if FLAGS.nfe is not None and mode not in ("sample", "eval", "all"):
    from sgm_jax.errors import InputError
    raise InputError(f"--nfe is a flag of --mode sample, eval and all, not of --mode {mode}")
  if mode == "import":
    from sgm_jax.cli import import_checkpoint
    done = import_checkpoint.run_import(config, workdir, FLAGS.checkpoint, FLAGS.classifier)
    what = (f"classifier in {done['classifier']}" if "classifier" in done else
            f"checkpoint at step {done['step']} in {workdir}/checkpoints")
    print(f"imported {done['num_params']:,} parameters from {done['source']}: {what}")
  if mode in ("train", "all"):
    state = train.run_train(config, workdir)
    print(f"trained to step {int(state.step)}: checkpoints in {workdir}/checkpoints, loss curve "
          f"{workdir}/loss_curve.png, TensorBoard logs in {workdir}/tensorboard")
  if mode == "sample":
    _print_samples(sample.run_sample(config, workdir, FLAGS.sampler, FLAGS.num_steps,
                                     FLAGS.num_samples, FLAGS.checkpoint_step,
                                     class_label=FLAGS.class_label,
                                     classifier_scale=FLAGS.classifier_scale, nfe=FLAGS.nfe,
                                     **_parse_options(FLAGS.sampler_option)))
  if mode == "train_classifier":
    metrics = train_classifier.run_train_classifier(config, workdir)
    shown = {k: v for k, v in metrics.items() if k != "metrics_file"}
    print(f"classifier trained to step {metrics['step']} in {workdir}/classifier: test accuracy "
          f"{json.dumps(shown)}; written to {metrics['metrics_file']}")
  if mode in ("inpaint", "colorize", "interpolate"):
    _print_controllable(mode, _run_controllable(config, workdir, mode))
  if mode == "all":
    results, side_by_side = sample.run_sampler_comparison(config, workdir)
    for result in results:
      _print_samples(result)
    print(f"the samplers side by side: {side_by_side}")
  if mode in ("eval", "all"):
    result = evaluate.run_eval(config, workdir, FLAGS.checkpoint_step, FLAGS.sampler,
                               FLAGS.num_steps, FLAGS.num_samples, nfe=FLAGS.nfe,
                               **(_parse_options(FLAGS.sampler_option) if mode == "eval" else {}))
    shown = {k: v for k, v in result.items() if k not in ("results_file", "denoising_error")}
    if "denoising_error" in result:
      shown["denoising_error"] = result["denoising_error"]["png"]
    print(f"evaluation of checkpoint {result['checkpoint_step']}: {json.dumps(shown)}\n"
          f"appended to {result['results_file']}")


def _initialize_distributed():
  """jax.distributed for a job of several processes (before anything touches the devices)."""
  import jax
  from sgm_jax import parallel
  from sgm_jax.errors import InputError
  started = parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                            FLAGS.process_id, auto=FLAGS.distributed == "auto")
  if started and jax.process_count() > 1 and FLAGS.mode not in MULTI_PROCESS_MODES:
    raise InputError(f"--mode {FLAGS.mode} runs in one process; modes that run over several "
                     f"processes are {list(MULTI_PROCESS_MODES)}")
  if started and not parallel.is_first_process():  # one copy of the progress lines and results
    sys.stdout = open(os.devnull, "w")


def _run_controllable(config, workdir, mode):
  """--mode inpaint|colorize|interpolate; returns the mode's result."""
  from sgm_jax.cli import controllable
  common = dict(input_path=FLAGS.input, checkpoint_step=FLAGS.checkpoint_step)
  if mode == "interpolate":
    return controllable.run_interpolate(config, workdir, FLAGS.num_samples, FLAGS.num_points,
                                        **common)
  if mode == "inpaint":
    common["mask"] = FLAGS.mask
  run = controllable.run_inpaint if mode == "inpaint" else controllable.run_colorize
  return run(config, workdir, FLAGS.sampler, FLAGS.num_steps, FLAGS.num_samples, **common,
             **_parse_options(FLAGS.sampler_option))


def _print_controllable(mode, result):
  shown = {k: v for k, v in result.items() if k not in ("png", "npz", "json")}
  print(f"{mode}: {json.dumps(shown)}\nimages {result['png']}, arrays {result['npz']}, "
        f"summary {result['json']}")


def _print_samples(result):
  from sgm_jax.cli import outputs
  label = (f" of class {result['class_label']} (classifier scale {result['classifier_scale']:g})"
           if "class_label" in result else "")
  steps = outputs.steps_phrase(result["sampler"], result["num_steps"], result["sampler_options"])
  print(f"{result['num_samples']} samples{label} by {result['sampler']} {steps} "
        f"({result['nfe']:.0f} score evaluations per batch) "
        f"from checkpoint {result['checkpoint_step']}: {result['png']} and {result['npz']}"
        + ("" if result.get("out_of_range") is None else
           f"; {100 * result['out_of_range']:.2f} % of pixels outside [-1.1, 1.1] before clipping"))


def _parse_flags(argv):
  """absl's flag parsing, with one clear line for a --config.x=y override of a missing field."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # a missing field, or a missing section
    print(f"error: unknown config field in a --config override: {e}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """Entry point: a mistake in the input (sgm_jax.errors.UserError) is one line `error: ...` and
  exit code 2; anything else is a fault, shown with its traceback and exit code 1."""
  from sgm_jax.errors import UserError
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit:
    raise
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    print("error: the traceback above is not a problem with the config, flags or files given; it "
          "is a fault in sgm-jax or a library it uses, or a machine limit (e.g. out of memory). "
          "Please report it with the traceback.", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
