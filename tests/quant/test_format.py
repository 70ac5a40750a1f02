"""The weight-format registry: a format added in one class (here a toy one, registered by a fixture) is read
from a checkpoint's quantization_config, gives every Linear its method through loading, and is a choice of the
CLI, without any other file knowing its name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BUNDLED_MODEL

from microscale import LLM
from microscale.cli import build_parser
from microscale.layers.linear import Linear
from microscale.quant.base import UnquantizedLinearMethod
from microscale.quant.format import (
    WEIGHT_FORMATS,
    CheckpointQuant,
    WeightFormat,
    known_weight_formats,
    register_weight_format,
)
from microscale.quant.scheme import QuantScheme


class ToyLinearMethod(UnquantizedLinearMethod):
    """16-bit weights under another name: what matters is that the model gets it."""


class ToyFormat(WeightFormat):
    name = "toy"
    linear_method_class = ToyLinearMethod
    checkpoint_method = "toy-quant"
    checkpoint_description = "toy checkpoints of version 1"

    def read_checkpoint(self, quantization_config):
        if quantization_config.get("version") != 1:
            return None
        return CheckpointQuant(linear=self.name)


@pytest.fixture
def toy_format():
    register_weight_format(ToyFormat)
    yield ToyFormat
    WEIGHT_FORMATS.unregister(ToyFormat.name)


def _toy_checkpoint(folder: Path, quantization_config: dict) -> Path:
    folder.mkdir()
    for path in BUNDLED_MODEL.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "config.json").unlink()
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return folder


def test_a_toy_format_is_read_from_the_checkpoint_and_given_to_every_linear(toy_format, tmp_path):
    llm = LLM(str(_toy_checkpoint(tmp_path / "toy", {"quant_method": "toy-quant", "version": 1})),
              dtype="float32", max_model_len=64)
    assert llm.engine.quant == QuantScheme(linear="toy", prequantized=True)
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]
    assert linears and all(type(m.quant_method) is ToyLinearMethod for m in linears)


def test_a_toy_format_is_a_load_time_choice_of_the_cli(toy_format):
    assert "toy" in known_weight_formats()
    args = build_parser().parse_args(["serve", "m", "--quant", "toy"])
    assert args.quantization == "toy"
    assert type(QuantScheme.resolve(args.quantization, None).linear_method()) is ToyLinearMethod
    with pytest.raises(SystemExit):  # not exportable: no `quantize` choice
        build_parser().parse_args(["quantize", "m", "--quant", "toy", "--out", "x"])


def test_the_fixture_leaves_the_registry_as_it_was():
    assert "toy" not in known_weight_formats()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--quant", "toy"])


def test_a_checkpoint_no_format_reads_names_the_formats_that_could(toy_format):
    with pytest.raises(ValueError, match="Unsupported toy-quant scheme: microscale loads toy checkpoints of version 1"):
        QuantScheme.resolve(None, {"quant_method": "toy-quant", "version": 2})
    with pytest.raises(ValueError, match=r"cannot load \(supported: .*toy-quant"):
        QuantScheme.resolve(None, {"quant_method": "gptq"})


def test_a_prequantized_checkpoint_keeps_its_format(toy_format):
    with pytest.raises(ValueError, match=r"already quantized \(toy\); it cannot be loaded as mxfp4"):
        QuantScheme.resolve("mxfp4", {"quant_method": "toy-quant", "version": 1})
    # MXFP4 checkpoints fix only the experts: the Linears take the user's format.
    assert QuantScheme.resolve("toy", {"quant_method": "mxfp4"}) == QuantScheme(linear="toy", experts="mxfp4")

