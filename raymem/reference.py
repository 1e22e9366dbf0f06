"""The configuration reference (docs/configuration.md), rendered from the typed configs themselves.

    python -m raymem.reference > docs/configuration.md

A unit test compares the file with this rendering, so the reference cannot drift from the code.
"""

from __future__ import annotations

import sys
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raymem import config, jobconfig, sweep

SECTIONS: list[tuple[type[BaseModel], str]] = [
    (config.IngestConfig, "`raymem ingest --config`; the `ingest` section of job and study files"),
    (config.DetectorTrainConfig, "`raymem train-detector`; the `detector` section (without dataset, out, run_name, "
                                 "experiment)"),
    (config.EmbedConfig, "`raymem embed`; the `embed` section (without detector, data, out)"),
    (config.LDMTrainConfig, "`raymem train-ldm`; the `ldm` section (without dataset, out, run_name, experiment, "
                            "in job files without split, in studies without the swept factors) and the `null` "
                            "section of job files (over the `ldm` section's values)"),
    (config.AugmentConfig, "`ldm.augment`"),
    (config.SampleConfig, "`raymem sample`; the `sample` section (without run, out; in studies without epoch)"),
    (config.AuditConfig, "`raymem audit --config`; the `audit` section (plus `distributed` in job files)"),
    (jobconfig.JobConfig, "a job file: `python jobs/pipeline.py --config` and `make demo`"),
    (jobconfig.PhantomSource, "`data.phantoms` of job and study files"),
    (sweep.StudyConfig, "a study file: `raymem sweep --config`, `python jobs/sweep.py --config`"),
    (sweep.Factors, "`factors` of a study file: each a list of levels"),
    (sweep.EarlyStop, "`early_stop` of a study file"),
]


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(repr(value) for value in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "").replace("raymem.", "").replace("|", "\\|")


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{value!r}`"


def _limits(field) -> str:
    parts = []
    for item in field.metadata:
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, name, None) is not None:
                parts.append(f"{symbol} {getattr(item, name)}")
        if getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the typed configs (`python -m raymem.reference > docs/configuration.md`); a test keeps",
             "it equal to the code. Every file is validated on load and a bad value names its field.", ""]
    for model, where in SECTIONS:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## {model.__name__}", "", f"{doc} Used by {where}.", "",
                  "| field | type | default | limits | description |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {_limits(field)} | "
                         f"{description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
