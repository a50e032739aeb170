"""Every detection benchmark (multigen, visor, geneval) scores all models of a folder on one prompts x images:
a run adding a model at another --images or --prompts is refused before any work, instead of rescoring the
models already there on the new protocol and overwriting their summary."""

from __future__ import annotations

import json

import pytest

from tcompose.evaluate.benchmark import DetectionConfig, check_protocol
from tcompose.io.errors import UserError
from tcompose.models.spec import parse_model_specs


def _folder(tmp_path, images=3, prompts=40):
    (tmp_path / "run.json").write_text(json.dumps({"models": {"A": {}}, "images_per_prompt": images,
                                                   "num_prompts": prompts}))
    return tmp_path


@pytest.mark.parametrize("images, prompts, option", [(2, 40, "--images"), (3, 41, "--prompts")])
def test_adding_a_model_at_another_protocol_is_refused(tmp_path, images, prompts, option):
    cfg = DetectionConfig(["B=org/b"], _folder(tmp_path), images=images)
    with pytest.raises(UserError, match=rf"{option} .*model\(s\) A were run at {option} .*--model A=\.\.\."):
        check_protocol(cfg, parse_model_specs(cfg.models), prompts)


def test_the_same_protocol_or_every_model_named_goes_on(tmp_path):
    folder = _folder(tmp_path)
    check_protocol(DetectionConfig(["B=org/b"], folder, images=3), parse_model_specs(["B=org/b"]), 40)
    both = ["A=org/a", "B=org/b"]  # naming every model changes the protocol for all of them (extends the folder)
    check_protocol(DetectionConfig(both, folder, images=5), parse_model_specs(both), 50)
    check_protocol(DetectionConfig(["B=org/b"], tmp_path / "new", images=2), parse_model_specs(["B=org/b"]), 1)
