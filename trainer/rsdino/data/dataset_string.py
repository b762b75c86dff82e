"""DINOv2-style dataset strings, e.g. "Multimodality:split=TRAIN:root=/data/sen12ms".

Plain string parsing, outside `rsdino.data.sources` so the config loader stays free of torch.
"""

from __future__ import annotations

# Dataset name in the string -> source name in the config.
DATASET_SOURCES: dict[str, str] = {"Multimodality": "sen12ms", "Sentinel2": "satlas"}
_FIELDS = ("split", "root")


def parse_dataset_string(text: str) -> dict[str, str]:
    """`Name:split=SPLIT:root=URI` -> {"source", "split" (lower case), "uri"}.

    The root may itself contain ':' (s3://bucket/path): a segment without '=' continues the
    value before it.
    """
    name, _, rest = text.partition(":")
    if name not in DATASET_SOURCES:
        raise ValueError(
            f"unknown dataset {name!r} in {text!r}; known datasets: {sorted(DATASET_SOURCES)}"
        )
    fields: dict[str, str] = {}
    last_field = None
    for segment in rest.split(":") if rest else []:
        field, equals, value = segment.partition("=")
        if equals and field in _FIELDS and field not in fields:
            fields[field] = value
            last_field = field
        elif not equals and last_field is not None:
            fields[last_field] += ":" + segment
        else:
            raise ValueError(
                f"cannot parse dataset string {text!r}: expected "
                f"'{name}:split=SPLIT:root=URI', got segment {segment!r}"
            )
    missing = [field for field in _FIELDS if not fields.get(field)]
    if missing:
        raise ValueError(f"dataset string {text!r} lacks {', '.join(missing)}")
    return {
        "source": DATASET_SOURCES[name],
        "split": fields["split"].lower(),
        "uri": fields["root"],
    }
