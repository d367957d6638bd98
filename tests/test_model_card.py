"""The model card says what an encoder was trained with and judges the issue's targets from the recorded
figures only: a card must never call a plain-DINOv2 run MammoDINO, nor a retrieval figure at chance met."""

from __future__ import annotations

from training.evaluate.model_card import method, targets


def test_the_card_names_the_sampler_and_losses_the_config_used():
    plain = method({"train": {"naive_sampler": True}, "loss": {"dbt_weight": 0.0}})
    assert "plain DINOv2" in plain and "DBT" not in plain
    full = method({"train": {"naive_sampler": False}, "loss": {"dbt_weight": 1.0}})
    assert "tissue-aware" in full and "DBT adjacent-slice loss" in full


def evaluation(trained: dict, random: dict, chance: dict) -> dict:
    return {"trained": trained, "random_init": random, "chance": chance}


def test_targets_compare_with_random_init_and_with_the_measured_chance():
    rows = {label: (seen, met) for label, _, seen, met in targets(evaluation(
        {"real_density_bal_acc": {"value": 0.50}, "phantom_lesion_patch_auroc": 0.80, "real_view_topk": 0.10,
         "real_view_queries": 8, "real_view_mean_rank": 12.0, "phantom_view_topk": 0.05,
         "cbis_attention_ratio": 1.31},
        {"real_density_bal_acc": {"value": 0.40}, "phantom_lesion_patch_auroc": 0.75, "real_view_topk": 0.0,
         "phantom_view_topk": 0.04, "cbis_attention_ratio": 1.0},
        {"real_view_topk": 0.06, "real_view_mean_rank": 42.0, "phantom_view_topk": 0.021}))}
    assert rows["density balanced accuracy, real held-out"] == ("0.500 vs 0.400 (+0.100)", True)
    assert rows["lesion patch AUROC, phantom benchmark"][1] is False  # +0.05 < +0.08
    assert rows["same-breast view in top k, real views"] == ("0.100 (random init 0.000); 8 queries", False)
    assert rows["same-breast view in top k, phantom benchmark"][1] is True  # 0.05 >= 2 x 0.021
    assert rows["same-breast view: the partner's mean rank, real views"] == ("12.000 (random init n/a); 8 queries", True)
    assert rows["attention in tissue / uniform, real CBIS-DDSM views"][1] is True
    assert rows["density balanced accuracy, phantom benchmark"] == ("n/a", None)  # not measured: not met either
