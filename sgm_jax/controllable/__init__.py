"""Controllable generation (Song et al., ICLR 2021, Sec. 5 and App. I): inpainting, colorization,
class-conditional sampling with a noise-conditional classifier, and latent encoding/interpolation
through the probability-flow ODE. Every procedure is built once and called with (key, score_fn, ...).

Only what is task-specific lives here: inpainting and colorization are a projection hook that any
sampler of sgm_jax.sampling applies after each update (`replacement_hook`), class-conditional
sampling is a score wrapper (`conditional_score_fn`); the loops are the samplers'.
"""
from sgm_jax.controllable.conditional import (NoiseConditionalLogits, classifier_log_prob_fn,
                                              classifier_loss, conditional_score_fn,
                                              get_classifier_train_step, log_prob_from_logits,
                                              mixture_class_probs, mixture_log_prob_fn,
                                              train_classifier, train_classifier_step,
                                              wrn_log_prob_fn)
from sgm_jax.controllable.inpainting import (COLOR_BASIS, METHODS, Colorizer, Inpainter, couple,
                                             decouple, get_colorizer, get_inpainter,
                                             replacement_hook, to_gray)
from sgm_jax.controllable.latent import (get_decode_fn, get_encode_fn, get_interpolator,
                                         interpolate, interpolation_strip,
                                         save_interpolation_strip, slerp)

__all__ = [
    "COLOR_BASIS", "METHODS", "Colorizer", "Inpainter", "NoiseConditionalLogits",
    "classifier_log_prob_fn", "classifier_loss", "conditional_score_fn", "couple", "decouple",
    "get_classifier_train_step", "get_colorizer", "get_decode_fn", "get_encode_fn",
    "get_inpainter", "get_interpolator", "interpolate", "interpolation_strip",
    "log_prob_from_logits", "mixture_class_probs", "mixture_log_prob_fn", "replacement_hook",
    "save_interpolation_strip", "slerp", "to_gray", "train_classifier", "train_classifier_step",
    "wrn_log_prob_fn",
]
