from pathlib import Path

import pandas as pd

from stages.evaluate import evaluate


def test_metrics_agree_with_the_confusion_table_of_labels_and_probabilities(
    fp32_dir: Path, curated: Path
) -> None:
    test = pd.read_parquet(curated / "test.parquet")
    metrics, confusion = evaluate(fp32_dir, test)
    assert len(confusion) == len(test)
    assert confusion["actual"].tolist() == test["target"].astype(str).tolist()
    assert metrics["accuracy"] == (confusion.actual == confusion.predicted).mean()
    assert set(metrics["per_class"]) == {str(c) for c in range(10)}
    assert sum(c["support"] for c in metrics["per_class"].values()) == len(test)
    assert 0 < metrics["macro_f1"] <= 1
    # the predicted class's probability (it ranks the card's most confused test images):
    # an argmax of 10 classes has at least 0.1 of the mass
    assert confusion["probability"].between(0.1, 1).all()
    assert (confusion["probability"] == confusion["probability"].round(4)).all()
