"""examples/train_lm.py runs end to end (its smoke preset: seconds)."""
import importlib.util
import json
import math
import pathlib

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_lm.py"


def test_train_lm_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--preset", "smoke", "--backend", "reference", "--out", str(tmp_path), "--quantize"])
    saved = json.loads((tmp_path / "results.json").read_text())
    results = {r["variant"]: r for r in saved["results"]}
    assert list(results) == ["dense", "peer_bn", "peer"]
    for variant, r in results.items():
        assert len(r["curve"]["train_loss"]) == saved["settings"]["steps"]
        assert r["eval_loss"] < math.log(256), variant   # better than guessing bytes uniformly
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    peer, dense = results["peer"], results["dense"]
    assert abs(dense["middle_ffn_active_parameters"] - peer["middle_ffn_active_parameters"]) < 0.05 * \
        peer["middle_ffn_active_parameters"]
    for r in (results["peer_bn"], peer):
        assert 0 < r["used_fraction"] <= 1 and 0 <= r["kl_from_uniform"] <= math.log(saved["settings"]["num_experts"])
        # quantized tables, for inference: close to the float model's perplexity, not equal to it
        for name in example.quantized_dtypes(torch.device(saved["device"])):
            close = {"int8": 0.02, "fp8": 0.1}[name]
            assert r[f"eval_perplexity_{name}"] != r["eval_perplexity"]
            assert r[f"eval_perplexity_{name}"] == pytest.approx(r["eval_perplexity"], rel=close), name
    assert "eval_perplexity_int8" not in results["dense"]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").stat().st_size > 0
