"""`data/curated/schema.json`, what the curated data is: one builder (both ingest engines)
and one parser (every reader). A key a reader needs and the file lacks is a StageError
naming it; nothing is guessed."""

from dataclasses import dataclass, field
from typing import Any

from fullstack_ml.stage import StageError

KINDS = ("numeric", "categorical", "image")
IMAGE_KEYS = ("size", "mode", "channels", "mean", "std", "resize")


@dataclass(frozen=True)
class Schema:
    """The parsed `schema.json`."""

    features: list[str]
    kinds: dict[str, str]  # feature -> numeric | categorical | image
    nullable: set[str]
    categories: dict[str, list[Any]]  # the train vocabulary of categorical features
    target: str
    task: str  # classification | regression
    classes: list[Any]
    rows: dict[str, int]  # split -> rows
    # image feature -> size [width, height], mode, channels, and per-channel mean and std
    # (of pixels scaled to 0-1, on train): `runtime.images.ImageSpec` and the normalisation
    images: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [*self.features, self.target]

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.features if self.kinds[c] == "numeric"]

    @property
    def categorical(self) -> list[str]:
        return [c for c in self.features if self.kinds[c] == "categorical"]

    @property
    def image(self) -> list[str]:
        return [c for c in self.features if self.kinds[c] == "image"]

    def kind(self, column: str) -> str:
        if column == self.target:
            return "categorical" if self.task == "classification" else "numeric"
        return self.kinds.get(column, "numeric")


def build_schema(
    *,
    source: str,
    task: str,
    types: dict[str, str],
    numeric: list[str],
    categorical: list[str],
    target: str,
    target_dtype: str,
    nullable: set[str],
    ranges: dict[str, tuple[float | None, float | None]],
    categories: dict[str, list[Any]],
    classes: list[Any],
    rows: dict[str, int],
    dropped_rows: int,
    duplicate_rows: int,
    split: dict[str, Any],
    engine: str,
) -> dict[str, Any]:
    """The content of `schema.json`.

    Args:
        types: every source column's schema type (declared or inferred).
        nullable: features with a missing value in any split.
        ranges: numeric feature -> (min, max) on train; None where train has no value.
        categories: categorical feature -> the values seen in train.
        classes: the target's values (classification), else empty.
    """
    features = []
    for c in [*numeric, *categorical]:
        entry: dict[str, Any] = {"name": c, "type": types[c], "nullable": c in nullable}
        if c in numeric:
            low, high = ranges.get(c, (None, None))
            entry.update(dtype="float64", kind="numeric", min=low, max=high)
        else:
            entry.update(dtype="object", kind="categorical", categories=sorted(categories[c]))
        features.append(entry)
    return {
        "source": source,
        "task": task,
        "features": features,
        "target": {"name": target, "dtype": target_dtype},
        "classes": sorted(classes) if task == "classification" else [],
        "columns": types,  # the inferred or declared schema: copy it into data.columns
        "rows": rows,
        "dropped_rows": dropped_rows,
        "duplicate_rows": duplicate_rows,
        "split": {"strategy": split["strategy"], "column": split.get("column")},
        "engine": engine,
    }


def parse_schema(schema: dict[str, Any], name: str = "schema.json") -> Schema:
    """`schema.json` as `build_schema` writes it (`name`: the file, for messages)."""

    def need(mapping: Any, key: str, where: str) -> Any:
        if not isinstance(mapping, dict) or key not in mapping:
            raise StageError(f"{name}: missing key {where}{key!r}")
        return mapping[key]

    features = need(schema, "features", "")
    if not isinstance(features, list):
        raise StageError(f"{name}: 'features' is not a list")
    kinds, nullable, categories, images = {}, set(), {}, {}
    for i, f in enumerate(features):
        feature = need(f, "name", f"features[{i}].")
        kinds[feature] = need(f, "kind", f"features[{i}].")
        if kinds[feature] not in KINDS:
            raise StageError(
                f"{name}: features[{i}].kind {kinds[feature]!r} is not {' | '.join(KINDS)}"
            )
        if f.get("nullable"):
            nullable.add(feature)
        if kinds[feature] == "categorical":
            categories[feature] = list(need(f, "categories", f"features[{i}]."))
        if kinds[feature] == "image":
            images[feature] = {key: need(f, key, f"features[{i}].") for key in IMAGE_KEYS}
    task = need(schema, "task", "")
    if task not in ("classification", "regression"):
        raise StageError(f"{name}: task {task!r} is not classification | regression")
    return Schema(
        features=[f["name"] for f in features],
        kinds=kinds,
        nullable=nullable,
        categories=categories,
        target=need(need(schema, "target", ""), "name", "target."),
        task=task,
        classes=list(need(schema, "classes", "")),
        rows=dict(need(schema, "rows", "")),
        images=images,
    )
