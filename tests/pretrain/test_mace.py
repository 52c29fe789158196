"""MACE (mace-torch) as a maskpot backbone: the model test battery, the flag as a node attribute, bad config."""
import os

import numpy as np
import pytest
import torch

from data_shards import keys as K
from data_shards.config_io import ConfigError
from pretrain.models import MODELS, build_model
from pretrain.models.mace import mace_modules
from tests.helpers.model_mixin import ModelTestMixin
from tests.helpers.water_systems import to_batch, water_box

pytestmark = pytest.mark.skipif(mace_modules() is None,
                                reason="mace-torch is not installed (pip install 'maskpot[mace]')")

# small but complete: 2 interactions, ℓ up to 2 on edges, L=1 messages, correlation 2; cutoff below the
# half box width of the 8-water test box
SMALL = {"num_channels": 8, "max_L": 1, "correlation": 2, "num_interactions": 2, "max_ell": 2, "r_max": 3.5,
         "radial_MLP": [16], "MLP_irreps": "8x0e", "avg_num_neighbors": 10.0, "elements": [1, 8]}


class TestMACE(ModelTestMixin):
    def build(self):
        return build_model("mace", SMALL)


class TestMACECorrelation3NonResidualFirst(ModelTestMixin):
    def build(self):
        return build_model("mace", {**SMALL, "correlation": 3, "max_L": 0,
                                    "interaction_first": "RealAgnosticInteractionBlock"})


def test_registered_and_contract():
    assert "mace" in MODELS
    model = build_model("mace", SMALL)
    assert model.config.cutoff == SMALL["r_max"]
    assert not model.force_centric
    assert any(model.is_head_parameter(n) for n, _ in model.named_parameters())
    assert not all(model.is_head_parameter(n) for n, _ in model.named_parameters())


def test_weights_only_env_not_left_set():
    """mace/__init__ sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; our import must leave the process as it was."""
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_flag_is_an_extra_node_attribute_next_to_the_one_hot():
    model = build_model("mace", SMALL).double()
    species = torch.tensor([8, 1, 1, 8])
    attrs = model.node_attrs(species, torch.tensor([0, 1, 0, 1]), torch.float64)
    assert attrs.tolist() == [[0, 1, 0], [1, 0, 1], [1, 0, 0], [0, 1, 1]]
    assert model.mace.node_embedding.linear.irreps_in.dim == 3  # H, O, flag


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key.*'bogus'.*valid keys.*num_channels.*r_max"):
        build_model("mace", {"bogus": 1})


@pytest.mark.parametrize("params, match", [
    ({"interaction": "Nope"}, r"interaction 'Nope' is not one of \['RealAgnosticResidualInteractionBlock'"),
    ({"max_L": 3, "max_ell": 2}, r"max_L \(3\) must be <= max_ell \(2\)"),
    ({"MLP_irreps": "sixteen"}, r"MLP_irreps 'sixteen' is not an e3nn irreps string"),
    ({"elements": [1, 1]}, r"elements must be distinct"),
    ({"r_max": 0.0}, r"r_max must be > 0"),
])
def test_bad_values_are_one_line_errors(params, match):
    with pytest.raises(ValueError, match=match) as info:
        build_model("mace", {**SMALL, **params})
    assert "\n" not in str(info.value)


def test_element_outside_the_one_hot_is_named():
    model = build_model("mace", {**SMALL, "elements": [1]})
    with pytest.raises(ValueError, match=r"elements Z=\[8\].*model.params.elements \[1\]"):
        model(to_batch([water_box(8, seed=2)], 3.5))


def test_bf16_forward_runs():
    """DeepSpeed bf16 casts the weights; the model follows them (positions keep theirs)."""
    model = build_model("mace", SMALL).to(torch.bfloat16)
    batch = to_batch([water_box(8, seed=2)], 3.5)
    out = model(batch, compute_forces=True)
    assert out[K.PRED_FORCES].dtype == batch[K.POSITIONS].dtype and torch.isfinite(out[K.PRED_FORCES]).all()
    assert np.isfinite(float(out[K.PRED_ENERGY][0]))


def test_shipped_mace_config_loads():
    from pathlib import Path

    from data_shards.config_io import load_config
    from pretrain.config import PretrainConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "mace_water.yaml"
    cfg = load_config(PretrainConfig, path)
    assert cfg.model.name == "mace" and cfg.model.cutoff == 5.0
    assert cfg.model.arch_params()["num_channels"] == 32
