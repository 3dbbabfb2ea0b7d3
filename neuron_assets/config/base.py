"""The pieces every config section is made of: the section base class, its error, and the
endpoint fields every LLM-backed section shares."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HOME = REPO_ROOT / "dagster_home"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LLMEndpointConfig(Section):
    """The fields every section that talks to an LLM shares (explain, simulate.prompted): which
    model, where it is served, and how requests to it are made."""

    model: str | None = None
    """The model: an OpenAI model name, the name a server serves, or a local Hugging Face path
    or name (vllm, transformers)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for a vLLM server. Unset:
    OpenAI's API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key. The key is read from the environment only,
    never stored or logged."""
    concurrency: int = Field(16, ge=1)
    """Requests in flight at once (OpenAI-compatible backends)."""
    max_retries: int = Field(3, ge=0)
    """Retries of a request after a 429, a 5xx, a timeout or a malformed answer."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request may take."""
    device: str = "auto"
    """torch device of the transformers backend: auto (cuda when available), cpu, cuda, ..."""
