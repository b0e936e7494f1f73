"""Configuration of the worker's policies, one model per concern (the gate, the audit, the
planner, the unlearning methods), each read from the environment and from one JSON file.

A concern's fields come, by precedence, from: the values given in code (tests, benchmarks), the
environment (``LETHE_<SECTION>_<FIELD>``, nested fields with ``__``), then the section named
after the concern in the JSON file ``LETHE_POLICY_FILE`` names (``{"gate": {...}, "audit":
{...}, "planner": {...}, "methods": {...}}``), then the defaults. ``config/gpu.json`` is the
documented profile for a GPU worker.
"""

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

POLICY_FILE_VARIABLE = "LETHE_POLICY_FILE"


class _FileSection(PydanticBaseSettingsSource):
    """One section of the policy file, or nothing when no file is named."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        path = os.environ.get(POLICY_FILE_VARIABLE)
        self.values: dict[str, Any] = {}
        if path:
            document = json.loads(Path(path).read_text())
            if not isinstance(document, dict):
                raise ValueError(f"{path}: the policy file must hold a JSON object")
            self.values = document.get(section, {})

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class PolicySettings(BaseSettings):
    """Base of every worker policy: subclasses set ``section`` and the matching env prefix."""

    section: ClassVar[str]
    model_config = SettingsConfigDict(
        env_ignore_empty=True, extra="forbid", env_nested_delimiter="__", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSection(settings_cls, cls.section)
