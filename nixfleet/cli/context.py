"""Per-invocation state shared by every command: global flags and a lazy client."""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from nixfleet.cli import config
from nixfleet.client import Client

CLI_TIMEOUT = 30.0  # total seconds per HTTP exchange


@dataclass
class State:
    url_flag: str | None = None
    key_flag: str | None = None
    key_file_flag: str | None = None
    context_flag: str | None = None
    json: bool = False
    wide: bool = False
    debug: bool = False
    _client: Client | None = field(default=None, repr=False)

    def config(self, read_key: bool = True) -> config.CliConfig:
        return config.resolve(
            self.url_flag, self.key_flag, self.key_file_flag, self.context_flag, read_key
        )

    def client(self) -> Client:
        if self._client is None:
            cfg = self.config()
            self._client = Client(cfg.control_plane_url, cfg.api_key, timeout=CLI_TIMEOUT)
        return self._client


pass_state = click.make_pass_decorator(State, ensure=True)
