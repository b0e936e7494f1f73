"""Policies the worker reads at each job: pydantic-settings models whose fields come from
``<prefix>*`` variables and, when ``<prefix>FILE`` names one, from a JSON file of the same
fields (the variables win over the file)."""

import os

from pydantic_settings import BaseSettings, JsonConfigSettingsSource, PydanticBaseSettingsSource


class FilePolicy(BaseSettings):
    """Subclasses set ``model_config = SettingsConfigDict(env_prefix=...)``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        path = os.environ.get(f"{cls.model_config.get('env_prefix', '')}FILE")
        if path:
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)
