"""Entry settings: defaults, then a TOML file ([entry] table), then command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from entry.routing_config import ProviderConfig, RoutingConfig, check_keys, parse_providers, parse_routing
from runtime.settings import load_settings, mesh_home


@dataclass
class EntryConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    listen_host: str = "127.0.0.1"  # libp2p
    p2p_port: int = 0  # 0 = any free port
    bootstrap: list[str] = field(default_factory=list)
    relay: bool = True  # circuit relay v2 hop for nodes nobody can dial (transport/relay.py)
    private_mesh: bool | None = None  # None: decided from listen_host and bootstrap (transport/addrs.py)
    identity: str | None = None  # default STATE_DIR/entry.key
    state_dir: str | None = None  # default $MESH_HOME/entry
    keys_db: str | None = None  # default $MESH_HOME/entry/keys.db, where `mesh entry keys` writes
    open: bool = False  # no API keys needed (a local mesh)
    rpm: int | None = None  # default requests/minute per key (open mode: for everyone together)
    tpm: int | None = None  # default tokens/minute per key (prompt + completion, reserved up front)
    max_body_bytes: int = 1_000_000
    first_token_timeout: float = 60.0
    token_timeout: float = 10.0
    sse_write_timeout: float = 10.0  # a streaming client that reads nothing this long loses its generation
    # When every node of a model is busy a request waits in the entry's queue (fair across API
    # keys) up to queue_wait seconds; at most queue_max requests wait, all models together.
    queue_wait: float = 300.0
    queue_max: int = 256
    log_format: str = "text"
    log_level: str = "info"
    # Verification and credits (entry/verify/verifier.py, entry/credits/ledger.py)
    ledger: str | None = None  # credits database; default STATE_DIR/credits.db
    verify_model: list[str] = field(default_factory=list)  # GGUF files to re-score nodes' outputs with
    verify_rate: float = 0.15  # fraction of an established node's requests re-scored
    canary_interval: float = 60.0  # mean seconds between canary probes; 0 = none
    # External OpenAI-compatible providers and routing policies: TOML only ([[entry.providers]],
    # [entry.routing]; schema in entry/routing_config.py). Raw tables become typed at construction.
    providers: list[ProviderConfig] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Score table (routing/tables.py format) the router is fitted on at start-up when
    # STATE_DIR/routing holds neither a router nor a table (the demo ships one).
    routing_table: str | None = None

    def __post_init__(self) -> None:
        self.providers = parse_providers(self.providers)
        self.routing = parse_routing(self.routing)

    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else mesh_home() / "entry"

    def identity_path(self) -> Path:
        return Path(self.identity) if self.identity else self.state_path() / "entry.key"

    def seed_secret_path(self) -> Path:
        return self.state_path() / "seed.key"

    def ledger_path(self) -> Path:
        return Path(self.ledger) if self.ledger else self.state_path() / "credits.db"

    def routing_dir(self) -> Path:
        """Where the benchmark phase keeps the score table, stats and fitted router."""
        return self.state_path() / "routing"

    def keys_path(self) -> Path:
        from entry.api.apikeys import default_keys_path

        return Path(self.keys_db) if self.keys_db else default_keys_path()

    def validate(self) -> None:
        for name in ("http_port", "p2p_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be in 0-65535")
        if self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be at least 1024")
        if self.first_token_timeout <= 0 or self.token_timeout <= 0 or self.sse_write_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if not self.queue_wait > 0:
            raise ValueError("--queue-wait must be > 0")
        if self.queue_max < 0:
            raise ValueError("--queue-max must be >= 0 (0: no queue, a request finding every node busy gets 503 at once)")
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ValueError("--verify-rate must be in [0, 1]")
        if self.canary_interval < 0:
            raise ValueError("--canary-interval must be >= 0")
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be at least 1")
        # Only at start-up (load_entry_config): a provider that needs a key must find it.
        check_keys(self.providers)


def load_entry_config(path: str | None, overrides: dict) -> EntryConfig:
    return load_settings(EntryConfig, path, "entry", overrides)
