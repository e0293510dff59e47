"""The pipeline's stages and their params schemas, all in one place: for checking the whole
params.yaml (`python -m llmpipe.params`, presets, the smoke run) and for the tests. A stage
itself imports only its own family's schema (llmpipe/<family>/params.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmpipe.data.params import DownloadParams, TokenizeParams
from llmpipe.errors import ParamsError
from llmpipe.evaluation.params import EvaluateParams
from llmpipe.export.params import QuantizeParams
from llmpipe.params import PARAMS_FILE, build, check_sections, read_params_file, shared_params
from llmpipe.rl.params import (
    GrpoParams,
    PreferencesParams,
    ReinforceParams,
    RewardModelParams,
    RlBaselineParams,
)
from llmpipe.task.params import TaskGrpoParams, TaskReinforceParams, TaskSftParams
from llmpipe.train.params import FinetuneParams, LoraParams, PretrainParams

STAGE_SCHEMAS: dict[str, type] = {
    schema.SECTION: schema
    for schema in (
        DownloadParams,
        TokenizeParams,
        PretrainParams,
        FinetuneParams,
        LoraParams,
        QuantizeParams,
        PreferencesParams,
        RewardModelParams,
        RlBaselineParams,
        GrpoParams,
        ReinforceParams,
        TaskSftParams,
        TaskReinforceParams,
        TaskGrpoParams,
        EvaluateParams,
    )
}


def validate_all(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Validate every section (for `python -m llmpipe.params` and the tests)."""
    return validate_mapping(read_params_file(path), str(path))


def validate_mapping(raw: dict[str, Any], path: str = "params") -> dict[str, Any]:
    check_sections(raw)
    validated: dict[str, Any] = {"shared": shared_params(raw)}
    for stage, schema in STAGE_SCHEMAS.items():
        if stage not in raw:
            raise ParamsError(f"{stage}: missing section in {path}")
        validated[stage] = build(schema, raw[stage], stage)
    return validated
