import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.model import (
    MLP,
    encode_split,
    encode_targets,
    load_fp32,
    predict_logits,
    save_fp32,
)
from fullstack_ml.runtime.program import for_batch, load_program, load_runner
from fullstack_ml.stage import StageError
from stages.compress import compress, write_report
from stages.compress.prune import finetune, prune_model, sparsity


@pytest.fixture(scope="module")
def data(fp32_dir: Path, curated: Path) -> dict:
    _, meta = load_fp32(fp32_dir)
    splits = {s: pd.read_parquet(curated / f"{s}.parquet") for s in ("train", "val", "test")}
    val_x, val_y = encode_split(splits["val"], meta)
    train = (encode_split(splits["train"], meta)[0], encode_targets(splits["train"].target, meta))
    return {
        "val": val_x,
        "val_y": val_y,
        "test": encode_split(splits["test"], meta),
        "train": train,
    }


def small(cfg: DictConfig, **changes) -> DictConfig:
    """The compress config without the report's pipelines, compile or many timings."""
    base = {"compile": False, "batch_sizes": [1, 256], "latency_repeats": 2, "runtimes": []}
    base["prune"] = {"finetune_epochs": 1}
    out = cfg.compress.copy()
    OmegaConf.set_struct(out, False)
    out.pipelines = changes.pop("pipelines", {})  # replaced, not merged
    return OmegaConf.merge(out, base, changes)


def run(fp32_dir: Path, data: dict, cfg: DictConfig, out: Path, **kwargs) -> dict:
    return compress(
        fp32_dir,
        data["val"],
        data["test"],
        cfg,
        out,
        val_y=data["val_y"],
        train=data["train"],
        **kwargs,
    )


def test_int8_model_is_smaller_and_as_accurate(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    x, y = data["test"]
    config = small(cfg, max_accuracy_drop=2.0, runtimes=["onnxruntime"])
    result = run(fp32_dir, data, config, tmp_path / "c")
    assert result["method"] == "int8_static"
    assert result["size_ratio"] < 0.3
    assert result["accuracy_drop_points"] <= 2.0
    int8 = load_program(tmp_path / "c" / "model.pt2")
    fp32, _ = load_fp32(fp32_dir)
    agree = (predict_logits(int8, x).argmax(1) == predict_logits(fp32, x).argmax(1)).mean()
    assert agree > 0.97
    assert result["compressed"]["accuracy"] == pytest.approx(
        float((predict_logits(int8, x).argmax(1) == y).mean())
    )
    assert result["compressed"]["latency_ms_batch256"] > 0
    assert result["fp32"]["latency_ms_batch1"] > 0
    files = ["model.json", "model.onnx", "model.pt2"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == files
    # no measured figure in the model folder: the same inputs give the same bytes
    run(fp32_dir, data, config, tmp_path / "again")
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_accuracy_budget_exceeded_fails_and_keeps_previous_model(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "model.pt2").write_bytes(b"previous")
    with pytest.raises(StageError, match=r"over the budget compress.max_accuracy_drop=-100"):
        run(fp32_dir, data, small(cfg, max_accuracy_drop=-100.0), out)
    assert (out / "model.pt2").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_a_layer_that_breaks_in_int8_is_left_in_fp32_and_the_rest_ships_in_int8(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages.compress import quantize as _  # noqa: F401  the module, for monkeypatch

    module = sys.modules["stages.compress.quantize"]
    fold = module.fold_weight_quantization
    first = load_fp32(fp32_dir)[0].net[0].weight.shape

    def broken_first_layer(gm: torch.fx.GraphModule) -> None:  # a bad INT8 kernel, say
        fold(gm)
        for name, weight in gm.named_buffers():
            if name.startswith("int8_weight_") and weight.shape == first:
                weight.copy_(weight.flip(0))

    monkeypatch.setattr(module, "fold_weight_quantization", broken_first_layer)
    result = run(fp32_dir, data, small(cfg), tmp_path / "c")
    assert result["method"] == "int8_static+fp32:net.0"
    assert result["budget"] == "within" and result["accuracy_drop_bound"] <= 1.0
    tried = {t["name"]: t["verdict"] for t in result["compressed"]["fallback"]}
    assert tried["int8_static+fp32:net.0"] == "within"
    assert tried["int8_static+fp32:net.3"] == "over"  # net.0 still broken
    assert result["size_ratio"] < 0.5  # two layers of three still INT8
    int8 = load_program(tmp_path / "c" / "model.pt2")
    assert {n for n, b in int8.named_buffers() if b.dtype == torch.int8}  # INT8 left
    assert json.loads((tmp_path / "c/model.json").read_text())["compression"] == result["method"]


def test_rows_too_few_to_judge_the_budget_warn_by_default_or_fail_when_asked(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    few = {**data, "val": data["val"][:20], "val_y": data["val_y"][:20]}
    few["test"] = (data["test"][0][:20], data["test"][1][:20])
    with caplog.at_level(logging.WARNING, logger="stages.compress"):
        result = run(fp32_dir, few, small(cfg), tmp_path / "c")
    assert result["budget"] == "unresolvable" and result["method"] == "int8_static"
    (line,) = [r.message for r in caplog.records if "cannot resolve" in r.message]
    assert line.startswith("40 rows of val+test cannot resolve compress.max_accuracy_drop=1.0")
    assert line.endswith("(compress.undecided=warn)")
    out = tmp_path / "strict"
    with pytest.raises(StageError, match=r"cannot resolve .*\(compress.undecided=fail\)$") as err:
        run(fp32_dir, few, small(cfg, undecided="fail"), out)
    assert "\n" not in str(err.value) and not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "int3"}, r"compress.method: unknown method 'int3' \(int8_static, "),
        ({"prune": {"method": "random"}}, "compress.prune.method: unknown method 'random'"),
        ({"prune": {"sparsity": 1.0}}, r"compress.prune.sparsity: 1.0 is not in \[0, 1\)"),
        ({"prune": {"sparsity": -0.1}}, r"compress.prune.sparsity: -0.1 is not in \[0, 1\)"),
        ({"pipelines": {"p": ["int8_static", "prune_structured"]}}, "compress.pipelines.p: "),
        ({"pipelines": {"d": ["distil", "woq_int4"]}}, "compress.pipelines.d: step 'distil' needs"),
        ({"objective": "speed"}, "compress.objective: 'speed'"),
        ({"eval_split": ["train"]}, "compress.eval_split: 'train' is not one of val, test"),
        ({"undecided": "maybe"}, r"compress.undecided: 'maybe' is not one of \('warn', 'fail'\)"),
        ({"confidence": 1.5}, r"compress.confidence: 1.5 is not in \(0.5, 1\)"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path, change: dict, message: str
) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "model.pt2").write_bytes(b"previous")
    with pytest.raises(StageError, match=message) as err:
        run(fp32_dir, data, small(cfg, **change), out, student_dir=tmp_path / "student")
    assert "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["model.pt2"]
    assert (out / "model.pt2").read_bytes() == b"previous"


def test_structured_pruning_drops_neurons_then_quantizes(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    model, meta = load_fp32(fp32_dir)
    pruned, pruned_meta = prune_model(model, "structured", 0.5, meta)
    hidden = meta["model"]["hidden_sizes"]
    assert pruned_meta["model"]["hidden_sizes"] == [h // 2 for h in hidden]
    layers = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in layers] == [*(h // 2 for h in hidden), len(meta["classes"])]
    changes = {"prune": {"method": "structured", "sparsity": 0.5}, "max_accuracy_drop": 10.0}
    result = run(fp32_dir, data, small(cfg, **changes), tmp_path / "c")
    assert result["method"] == "prune_structured+int8_static"
    assert result["compressed"]["hidden_sizes"] == [h // 2 for h in hidden]
    assert result["size_ratio"] < 0.2  # a quarter of the hidden weights, in int8
    assert result["compressed"]["accuracy"] > 0.85  # one fine-tune epoch
    saved = json.loads((tmp_path / "c/model.json").read_text())
    assert saved["model"]["hidden_sizes"] == [h // 2 for h in hidden]


def test_without_the_train_split_pruning_pipelines_are_skipped_or_refused(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    pipes = {"s": ["prune_structured", "int8_static"], "d": ["int8_dynamic"]}
    args = (fp32_dir, data["val"], data["test"])
    result = compress(*args, small(cfg, pipelines=pipes), tmp_path / "a")
    assert list(result["candidates"]) == ["fp32", "int8_static", "d"]
    pruned = small(cfg, prune={"method": "structured"})
    with pytest.raises(StageError, match="compress.prune.finetune_epochs: fine-tuning needs"):
        compress(*args, pruned, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_global_unstructured_pruning_keeps_its_sparsity_through_fine_tuning(
    fp32_dir: Path, data: dict, cfg: DictConfig
) -> None:
    model, meta = load_fp32(fp32_dir)
    pruned, _ = prune_model(model, "global_unstructured", 0.6, meta)
    tuned = finetune(pruned, data["train"], "classification", small(cfg).prune, seed=0)
    assert sparsity(tuned) == pytest.approx(0.6, abs=0.01)
    assert sparsity(model) < 0.01  # the FP32 model is untouched
    x, y = data["test"]
    assert (predict_logits(tuned, x).argmax(1) == y).mean() > 0.9


def test_each_method_exports_its_low_precision_weights(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    methods = ["int8_dynamic", "woq_int8", "woq_int4", "bf16"]
    pipes = {m: [m] for m in methods}
    result = run(fp32_dir, data, small(cfg, pipelines=pipes, method="none"), tmp_path / "c")
    rows = result["candidates"]
    assert list(rows) == ["fp32", "none", *methods]
    ratio = {k: r["size_bytes"] / rows["fp32"]["size_bytes"] for k, r in rows.items()}
    assert ratio["woq_int4"] < 0.2 < ratio["woq_int8"] < 0.3 < ratio["bf16"] < 0.55
    assert ratio["int8_dynamic"] < 0.3 and ratio["none"] == pytest.approx(1.0, abs=0.01)
    for m in methods:
        assert rows[m]["accuracy"] >= rows["fp32"]["accuracy"] - 0.02, m


def test_auto_tunes_with_inc_and_keeps_the_smallest_within_budget(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    changes = {"method": "auto", "tune": {"methods": ["int8_static", "woq_int4"]}}
    result = run(fp32_dir, data, small(cfg, max_accuracy_drop=3.0, **changes), tmp_path / "c")
    tuning = result["compressed"]["tuning"]
    assert [t["method"] for t in tuning] == ["int8_static", "woq_int4"]
    assert all(t["gate"]["verdict"] == "within" for t in tuning)  # judged on val+test
    assert [t["chosen"] for t in tuning] == [False, True]  # woq_int4 is the smaller
    assert tuning[1]["size_bytes"] < tuning[0]["size_bytes"]
    assert result["size_ratio"] < 0.2


def test_distil_pipeline_starts_from_the_student(
    fp32_dir: Path, data: dict, cfg: DictConfig, tmp_path: Path
) -> None:
    _, meta = load_fp32(fp32_dir)
    torch.manual_seed(0)
    student = MLP(data["train"][0].shape[1], len(meta["classes"]), [32])
    brief = OmegaConf.create({"finetune_epochs": 5, "lr": 0.01, "batch_size": 32})
    student = finetune(student, data["train"], "classification", brief, seed=0)
    student_meta = {**meta, "model": {**meta["model"], "hidden_sizes": [32]}}
    save_fp32(student, tmp_path / "student", student_meta)
    changes = {"method": "none", "pipelines": {"small": ["distil", "int8_static"]}}
    changes |= {"select": "best", "max_accuracy_drop": 20.0}
    result = run(
        fp32_dir, data, small(cfg, **changes), tmp_path / "c", student_dir=tmp_path / "student"
    )
    assert result["method"] == "small"
    assert result["compressed"]["accuracy"] > 0.8
    assert result["candidates"]["small"]["size_bytes"] < result["fp32"]["size_bytes"] / 20
    assert json.loads((tmp_path / "c/model.json").read_text())["model"]["hidden_sizes"] == [32]


def test_compiled_execution_paths_are_recorded_served_and_reported(
    fp32_dir: Path,
    data: dict,
    cfg: DictConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes = {"compile": True, "fp32_fallback": True, "batch_sizes": [1, 64]}
    result = run(fp32_dir, data, small(cfg, **changes), tmp_path / "c")
    meta = json.loads((tmp_path / "c/model.json").read_text())
    assert "serving" not in meta  # measured: in the metrics, not in the model folder
    serving = result["serving"]
    latency = serving["latency_ms"]
    assert set(latency) == {
        "compressed_eager",
        "compressed_compiled",
        "fp32_eager",
        "fp32_compiled",
    }
    assert all(set(t) == {"1", "64"} for t in latency.values())
    plan = serving["plan"]
    assert [b for b, _ in plan] == [1, 64]
    for b, path in plan:  # the fastest measured path per batch size
        assert latency[path][str(b)] == min(t[str(b)] for t in latency.values())
    assert (tmp_path / "c/fp32.pt2").exists()  # shipped by config (fp32_fallback), not by speed
    x, _ = data["test"]
    runner = load_runner(tmp_path / "c", serving, x.shape[1])
    assert [runner.path_for(n) for n in (1, 63, 64, 500)] == [plan[0][1]] * 2 + [plan[1][1]] * 2
    # a caller of batches of 64 (the predict stage) loads and compiles the path for 64 alone
    one = load_runner(tmp_path / "c", for_batch(serving, 64), x.shape[1])
    program = plan[1][1].rsplit("_", 1)[0]
    assert set(one.paths) == {"compressed_eager", f"{program}_eager", plan[1][1]}
    assert {one.path_for(n) for n in (1, 63, 64, 500)} == {plan[1][1]}
    eager = predict_logits(load_program(tmp_path / "c/model.pt2"), x)
    fp32 = predict_logits(load_fp32(fp32_dir)[0], x)
    for batch in (1, 64):
        got = predict_logits(runner, x[:128], batch)
        want = fp32 if runner.path_for(batch).startswith("fp32") else eager
        np.testing.assert_allclose(got, want[:128], atol=1e-3)
    # Where Inductor cannot compile (no C++ compiler, as in the container image): eager paths
    monkeypatch.setattr("fullstack_ml.runtime.program.shutil.which", lambda name: None)
    latency["compressed_compiled"] = {"1": 0.0, "64": 0.0}  # as if compiled were fastest
    fallback = load_runner(tmp_path / "c", serving, x.shape[1], logging.getLogger("t"))
    assert all(p.endswith("_eager") for _, p in fallback.plan)
    assert "torch.compile failed, serving eager (RuntimeError: no C++ compiler" in caplog.text
    np.testing.assert_allclose(predict_logits(fallback, x[:64], 64), eager[:64], atol=1e-5)
    write_report(result, "accuracy", tmp_path / "compress.csv", tmp_path / "compress.html")
    table = pd.read_csv(tmp_path / "compress.csv")
    assert table["name"].tolist() == ["fp32", "int8_static"]
    assert table["size_ratio"].iloc[0] == 1.0 and table["selected"].tolist() == [False, True]
    assert "compiled_ms_batch64" in table
    page = (tmp_path / "compress.html").read_text()
    assert "<table" in page and "<svg" in page and "int8_static" in page


@pytest.mark.parametrize("channels", [1, 3])
def test_an_int8_convnet_runs_its_convolutions_on_int8_weights_and_compiles(
    cfg: DictConfig, channels: int, tmp_path: Path
) -> None:
    """PT2E INT8 of a ConvNet: its graph dequantizes INT8 conv and linear weights (a quantizer
    can silently return FP32); a grey image's first conv stays FP32, where Inductor's INT8
    conv lowering fails, so the grey program compiles and answers as it runs eager."""
    from fullstack_ml.model import ConvNet
    from fullstack_ml.runtime.program import compile_module, save_program
    from stages.compress.quantize import calibrator, inc_config, int8_layers, quantize

    torch.manual_seed(0)
    width = channels * 256  # 16x16, as data=digits_images
    net = ConvNet(width, 4, (channels, 16, 16), [8, 16], hidden=16).eval()
    x = np.random.default_rng(0).normal(size=(64, width)).astype(np.float32)
    config = inc_config(cfg.compress.methods, "int8_static")
    model = quantize(net, config, calibrator(x, 2, 32), torch.from_numpy(x[:32]))
    assert int8_layers(model) == {"conv": [channels // 3 + 1, 2], "linear": [2, 2]}
    if channels == 1:  # the case that failed to compile; saved and loaded, as it ships
        save_program(model, tmp_path / "model.pt2", torch.from_numpy(x[:2]))
        program = load_program(tmp_path / "model.pt2")
        with torch.no_grad():
            eager = program(torch.from_numpy(x)).numpy()
            compiled = compile_module(program, width)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(compiled, eager, atol=0.05)
