"""Option groups: options declared once, given to several commands and folded into one argument of each.

- :func:`generation_options`: ``--seed``, ``--steps``, ``--guidance``, ``--scheduler``, ``--dtype``,
  ``--batch-size``, ``--height``, ``--width``, ``--safety-checker`` of every generating command (generate,
  multigen, visor, geneval, fid, latency, attnviz), folded into one
  :class:`tcompose.evaluate.settings.GenerationSettings`: the fields the command's stage reads (:meth:`GenerationSettings.taken_by`), its defaults
  (:meth:`GenerationSettings.for_stage`), the help texts of :data:`GENERATION_OPTIONS`;
- the Attend-and-Excite options (:data:`EXCITE_OPTIONS`: ``--attend-excite``, ``--excite-words``,
  ``--excite-steps``, ...) go with the generation options of generate, multigen, visor, geneval, latency and
  attnviz, folded into the settings' ``excite``;
- :func:`detection_options`: ``--detector``, ``--detector-revision``, ``--detector-dtype``,
  ``--detector-batch-size``, ``--store-threshold``, ``--threshold`` of the detection benchmarks (multigen,
  visor, geneval), folded into one dict of their config's fields (each command gives its detector's defaults).

A command names the group's argument where the options should stand (in ``--help`` too)::

    @app.command()
    @_friendly
    @generation_options("visor", seed="Base seed; image k of prompt unique_id has the same seed for every model.")
    def visor(model: ..., images: int = ..., settings: GenerationSettings = FROM_OPTIONS, ...) -> None:
        cfg = VisorConfig(..., settings=settings.replace(device=str(process_state().device)))

The device is no option: a command sets it. The decorators go under ``_friendly``, which then sees each option by
its name (a non-finite ``--guidance`` is refused as such) and turns a bad ``--safety-checker`` into one line.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import typer

from ..io.errors import UserError
from ..evaluate.settings import EXCITE_STAGES, ExciteSettings, GenerationSettings

__all__ = ["DETECTION_OPTIONS", "EXCITE_OPTIONS", "FROM_OPTIONS", "GENERATION_OPTIONS", "detection_options", "generation_options",
           "option_group"]

GENERATION_OPTIONS: dict[str, tuple[Any, str]] = {
    "seed": (int, "Base seed; image k of prompt p has a seed derived from (seed, p, k), the same for every model."),
    "steps": (Optional[int], "Denoising steps (default: the model card's: 50 for SD1.x / SD2.x / SDXL, 28 / 40 / 28 "
                             "for SD3-medium / SD3.5-medium / SD3.5-large, 50 for FLUX.1-dev, 4 for FLUX.1-schnell)."),
    "guidance": (Optional[float], "Classifier-free guidance scale (default: the model card's: 7.5 for SD1.x / SD2.x / "
                                  "SDXL, 7 / 4.5 / 3.5 for SD3-medium / SD3.5-medium / SD3.5-large, 3.5 for "
                                  "FLUX.1-dev's embedded guidance, 0 for FLUX.1-schnell)."),
    "scheduler": (Optional[str], "pndm, ddim, euler or dpm++ (default: the model's own)."),
    "dtype": (str, "Generation dtype: auto (fp16 on CUDA, fp32 on CPU), fp16, bf16 or fp32."),
    "batch_size": (int, "Images per pipeline call."),
    "height": (Optional[int], "Image height (default: the model's, 512 for SD1.x)."),
    "width": (Optional[int], "Image width (default: the model's)."),
    "safety_checker": (str, "on or off (recorded either way; off: a blacked-out image would count as a detection "
                            "miss)."),
}
"""Generation option (the GenerationSettings field of that name; ``--safety-checker`` takes on / off) -> (type,
help), in ``--help`` order."""

EXCITE_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "attend_excite": (bool, False, "Sample with Attend-and-Excite (Chefer et al. 2023; SD1.x / SD2.x): the latent is "
                                   "moved so each object word gets an attention peak. About 3x the sampling time."),
    "excite_words": (Optional[str], None, "Comma-separated words to excite (default: the benchmark's object names, "
                                          "or a free prompt's noun phrases)."),
    "excite_steps": (int, 25, "Attend-and-Excite: steps whose latent is updated (max_iter_to_alter)."),
    "excite_thresholds": (str, "0:0.05,10:0.5,20:0.8", "Attend-and-Excite: STEP:PEAK refinement thresholds."),
    "excite_refinements": (int, 20, "Attend-and-Excite: at most this many refinement steps per threshold."),
    "excite_scale": (float, 20.0, "Attend-and-Excite: gradient step size (shrinks over the steps)."),
    "excite_res": (int, 16, "Attend-and-Excite: side of the attention maps it reads (16 at 512 px)."),
}
"""Attend-and-Excite option -> (type, default, help), in ``--help`` order; given to the stages of
:data:`tcompose.evaluate.settings.EXCITE_STAGES` with the generation options, folded into ``settings.excite``."""

DETECTION_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "detector": (str, ..., "Detector checkpoint (hub id or folder)."),
    "detector_revision": (Optional[str], None, "Hub revision of --detector."),
    "detector_dtype": (str, ..., "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    "detector_batch_size": (int, ..., "Images per detector call."),
    "store_threshold": (float, 0.01, "Boxes scoring above this are stored."),
    "threshold": (Optional[float], None, "Boxes scoring above this count (default 0.1; --score-only: the run's)."),
}
"""Detection option -> (type, default (``...``: each command gives it), help), in ``--help`` order."""


class _FromOptions:
    def __repr__(self) -> str:
        return "FROM_OPTIONS"


FROM_OPTIONS: Any = _FromOptions()
"""The default of a command's group argument (``settings``, ``detection``): it stands for the group's options."""


def option_group(param: str, options: list[inspect.Parameter], fold: Callable[[dict[str, Any]], Any]
                 ) -> Callable[[Callable], Callable]:
    """A decorator: the command's ``param`` parameter becomes ``options`` (typer.Option defaults) in its
    signature, and at call time ``fold(their values by name)`` is passed as ``param``."""
    names = [p.name for p in options]
    annotations = {p.name: p.annotation for p in options}

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        if param not in sig.parameters:
            raise TypeError(f"{fn.__name__} has no {param} parameter to put its options in")
        own = list(sig.parameters.values())
        at = list(sig.parameters).index(param)
        new = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at] + options + own[at + 1:]]

        @functools.wraps(fn)
        def command(**kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return fn(**kwargs, **{param: fold(values)})

        command.__signature__ = sig.replace(parameters=new)
        command.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != param}, **annotations}
        return command

    return decorate


def _option(name: str, kind: Any, default: Any, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                             default=typer.Option(default, help=help))


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise UserError(f"--safety-checker {value!r}: use on or off")
    return value == "on"


def generation_options(stage: str, **help_texts: str) -> Callable[[Callable], Callable]:
    """The generation options of ``stage`` in place of the command's ``settings`` parameter, which receives the
    :class:`GenerationSettings` they make (the device left to the command). ``help_texts``: option -> a help text
    of this command's instead of :data:`GENERATION_OPTIONS`'."""
    if set(help_texts) - set(GENERATION_OPTIONS):
        raise TypeError(f"no generation option {sorted(set(help_texts) - set(GENERATION_OPTIONS))}")
    defaults = GenerationSettings.for_stage(stage)
    taken = GenerationSettings.taken_by(stage)
    options = []
    for name, (kind, text) in GENERATION_OPTIONS.items():
        if name in taken:
            default = getattr(defaults, name)
            default = ("on" if default else "off") if name == "safety_checker" else default
            options.append(_option(name, kind, default, help_texts.get(name, text)))

    if stage in EXCITE_STAGES:
        options += [_option(name, kind, default, text) for name, (kind, default, text) in EXCITE_OPTIONS.items()]

    def fold(values: dict[str, Any]) -> GenerationSettings:
        if "safety_checker" in values:
            values["safety_checker"] = _on_off(values["safety_checker"])
        excite = {name: values.pop(name) for name in EXCITE_OPTIONS if name in values}
        if excite.get("attend_excite"):
            words = excite["excite_words"]
            values["excite"] = ExciteSettings(
                steps=excite["excite_steps"], thresholds=ExciteSettings.parse_thresholds(excite["excite_thresholds"]),
                refinements=excite["excite_refinements"], scale=excite["excite_scale"], resolution=excite["excite_res"],
                words=tuple(w.strip() for w in words.split(",")) if words is not None else None)
        elif excite and (excite["excite_words"] is not None or any(
                excite[n] != EXCITE_OPTIONS[n][1] for n in EXCITE_OPTIONS if n not in ("attend_excite", "excite_words"))):
            raise UserError("--excite-* options change Attend-and-Excite, which is off: add --attend-excite")
        return defaults.replace(**values)

    return option_group("settings", options, fold)


def detection_options(**given: Any) -> Callable[[Callable], Callable]:
    """The detection options in place of the command's ``detection`` parameter, which receives their values by
    name (a dict; ``threshold`` None when not given). ``given``: option -> its default, or (default, help text)."""
    if set(given) - set(DETECTION_OPTIONS):
        raise TypeError(f"no detection option {sorted(set(given) - set(DETECTION_OPTIONS))}")
    options = []
    for name, (kind, default, text) in DETECTION_OPTIONS.items():
        value = given.get(name, default)
        default, text = value if isinstance(value, tuple) else (value, text)
        if default is ...:
            raise TypeError(f"detection_options: give {name}'s default")
        options.append(_option(name, kind, default, text))
    return option_group("detection", options, dict)
