"""The shipped demo encoder: it loads without a network, carries its provenance, names its heads'
classes, and attends mostly to the breast on a real CBIS-DDSM exam."""

from __future__ import annotations

import numpy as np
import pytest

from training.checkpoint import read_header, read_metadata
from training.encoder import DEMO_CHECKPOINT, load_encoder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo():
    return load_encoder(None)


def test_demo_file_is_small_fp16_with_its_provenance():
    assert DEMO_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    header = read_header(DEMO_CHECKPOINT)
    dtypes = {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    assert dtypes == {"F16"}
    meta = read_metadata(DEMO_CHECKPOINT)
    training = meta["training"]
    assert "pretrain" in training["command"] and training["steps"] > 0
    assert training["config"]["model"]["arch"] == meta["model"]["arch"]
    assert training["data"]["images"] > 0 and training["data"]["dbt"] > 0
    assert training["metrics"] and {"dino", "ibot", "koleo", "dbt"} <= set(training["metrics"][-1])
    assert set(meta["head_validation"]) == {"density", "lesion", "lesion_mask"}
    probes = meta["probe_benchmark"]["results"]
    # The model card's claim: the demo encoder beats random init on the phantom density probe.
    assert probes["demo"]["density"]["auroc"]["value"] > probes["random_init"]["density"]["auroc"]["value"]
    card = (DEMO_CHECKPOINT.parent / "README.md").read_text()
    assert f"{probes['demo']['density']['auroc']['value']:.3f}" in card


def test_demo_heads_give_named_predictions(demo):
    assert demo.heads["density"].classes == ["A", "B", "C", "D"]
    assert demo.heads["lesion"].classes == ["0", "1"]
    assert demo.heads["lesion_heatmap"].on == "patch"
    values = np.zeros((200, 160), np.float32)
    values[40:160, :110] = 1000 + 50 * np.random.default_rng(0).standard_normal((120, 110))
    out = demo.run(demo.prepare(values, values > 500))[0]
    assert set(out.predictions) == {"density", "lesion"}
    assert sum(out.predictions["density"].values()) == pytest.approx(1, abs=1e-5)
    assert out.heatmaps["lesion_heatmap"].shape == out.patches.shape[:2]


def test_demo_attention_lies_mostly_in_the_breast_on_a_real_exam(demo, cbis_cases):
    from training.infer import infer_image
    from training.io import open_image

    shares = [infer_image(demo, open_image(path)).attention_in_tissue for path in cbis_cases[0].values()]
    assert len(shares) == 4
    assert np.mean(shares) > 0.5
