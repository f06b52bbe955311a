"""Where `cy` finds the gateway and its keys: command-line options, then the environment, then
`~/.config/cy-llm/config.toml`, then `.data/api_key` as `just up` writes it, then the defaults."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import typer

from gateway.cli.errors import CliError

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_LITE_PORT = 8000
# The repository root (gateway/cli/config.py -> ../..): `just up` writes the key into its `.data`.
REPO_ROOT = Path(__file__).resolve().parents[2]

_FILE_KEYS = frozenset({"url", "api_key", "openai_url", "openai_token", "timeout"})


@dataclass(frozen=True)
class Config:
    url: str
    api_key: str
    openai_url: str
    openai_token: str
    timeout: float = 600.0


def config_path() -> Path:
    explicit = os.environ.get("CY_LLM_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cy-llm" / "config.toml"


def _read_file(path: Path) -> dict[str, Any]:
    """The config file's table, or {} when there is none. Raises CliError on a file that is not valid TOML
    or holds an unknown key (a typo should not silently fall back to a default)."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read config file {path}: {exc}", code="CONFIG") from None
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise CliError(
            f"config file {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_FILE_KEYS))})",
            code="CONFIG",
        )
    return data


def _repo_api_key() -> str:
    data_dir = Path(os.environ.get("CY_LLM_DATA_DIR") or REPO_ROOT / ".data")
    try:
        return (data_dir / "api_key").read_text().strip()
    except OSError:
        return ""


def lite_url_for(url: str) -> str:
    """The OpenAI-compatible API next to an /api/v1 URL: same host, port 8000, path /v1."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return urlunsplit((parts.scheme or "http", f"{host}:{DEFAULT_LITE_PORT}", "/v1", "", ""))


def load(url: str | None = None, api_key: str | None = None, openai_url: str | None = None) -> Config:
    """The effective configuration; arguments (command-line options) win. Raises CliError on a bad file."""
    env = os.environ
    file = _read_file(config_path())
    chosen_url = url or env.get("CY_LLM_URL") or file.get("url") or DEFAULT_URL
    # GATEWAY_API_TOKEN is the server's own variable (one token or several, comma-separated): in the shell that
    # started the gateway the client can use the first one.
    token = env.get("CY_LLM_OPENAI_TOKEN") or file.get("openai_token") or env.get("GATEWAY_API_TOKEN", "")
    timeout = env.get("CY_LLM_TIMEOUT") or file.get("timeout") or 600.0
    try:
        timeout_s = float(timeout)
    except ValueError:
        raise CliError(f"CY_LLM_TIMEOUT must be a number of seconds, not {timeout!r}", code="CONFIG") from None
    return Config(
        url=str(chosen_url).rstrip("/"),
        api_key=str(api_key or env.get("CY_LLM_API_KEY") or file.get("api_key") or _repo_api_key()).split(",")[0],
        openai_url=str(
            openai_url or env.get("CY_LLM_OPENAI_URL") or file.get("openai_url") or lite_url_for(str(chosen_url))
        ).rstrip("/"),
        openai_token=str(token).split(",")[0].strip(),
        timeout=timeout_s,
    )


def config_of(ctx: typer.Context) -> Config:
    """The Config the `cy` callback stored on the root context."""
    config: Config = ctx.find_root().obj
    return config
