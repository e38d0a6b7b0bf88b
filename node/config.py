"""Node settings: defaults, then a TOML file, then command-line flags (later wins)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.settings import load_settings, mesh_home


@dataclass
class NodeConfig:
    model: str | None = None  # GGUF path, "sha256:<hex>" or a model name (fetched from the mesh); None = bundled SmolLM2
    model_name: str | None = None  # the id users ask for; default: the file name without .gguf
    gpu_layers: int = 0  # layers offloaded to the GPU when the build supports it; -1 = all
    # llama.cpp threads of the node's one context: `threads` for decode steps, `threads_batch`
    # for steps reading prompt tokens; defaults: engine/threads.py (1-4 cores: one left free
    # while decoding), threads_batch = threads when only that is given.
    threads: int | None = None
    threads_batch: int | None = None
    ctx: int = 2048  # per generation: each slot may use the whole context
    slots: int = 1  # concurrent generations, decoded together as sequences of one llama.cpp context
    # KV cache cells kept for finished sequences so a request sharing their prefix (a chat's
    # next turn) skips re-reading it; None = one context's worth (ctx); 0 = off.
    prefix_cache_tokens: int | None = None
    queue: int = 8  # requests waiting for a slot before the node answers "busy"
    buffer_mb: int = 64  # MiB all requester streams together may hold in unfinished frames
    max_tokens: int = 1024  # longest generation this node accepts
    listen_host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    bootstrap: list[str] = field(default_factory=list)
    # NAT traversal (transport/addrs.py, reachability.py, relay.py)
    public_addr: list[str] = field(default_factory=list)  # claimed addresses (a port forward), checked by dial-back
    relay: bool = False  # relay circuits for others (a public node that opts in)
    direct_upgrade: bool = True  # turn relayed connections into direct ones (transport/dcutr.py)
    private_mesh: bool | None = None  # None: decided from listen_host and bootstrap
    identity: str | None = None  # key file; default STATE_DIR/node.key
    state_dir: str | None = None  # default $MESH_HOME/node (control socket, pid file)
    drain_seconds: float = 30.0
    advert_interval: float = 5.0  # seconds between advert refreshes; adverts live 4x this
    skip_benchmark: bool = False  # tests only: advertise zero speeds instead of measuring
    log_format: str = "text"
    log_level: str = "info"
    # Benchmarks and scale tests: serve a synthetic engine (engine/synthetic.py) under
    # this model name instead of a GGUF file, emitting synthetic_rate tokens/s per generation.
    synthetic: str | None = None
    synthetic_rate: float = 500.0
    share_model: bool = True  # hand our model file to nodes that fetch it (/mesh/model/1)
    share_rate: float = 50.0  # MB/s all uploads together may use
    # The volunteer's console (node/console.py) on http://127.0.0.1:console_port/; None = off,
    # 0 = any free port (logged and in the ready file). console_entries: entry base URLs whose
    # signed credit statements it shows next to the node's receipts.
    console_port: int | None = None
    console_entries: list[str] = field(default_factory=list)

    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else mesh_home() / "node"

    def identity_path(self) -> Path:
        return Path(self.identity) if self.identity else self.state_path() / "node.key"

    def control_socket(self) -> Path:
        return self.state_path() / "node.sock"

    def llama_threads(self) -> tuple[int, int]:
        """(n_threads, n_threads_batch) for the engine."""
        from engine.threads import default_threads

        decode, batch = default_threads()
        if self.threads:
            decode = batch = self.threads
        return decode, self.threads_batch or batch

    def prefix_cache_size(self) -> int:
        return self.ctx if self.prefix_cache_tokens is None else self.prefix_cache_tokens

    def validate(self) -> None:
        if self.slots < 1:
            raise ValueError("--slots must be at least 1")
        if self.slots > 128:
            raise ValueError("--slots must be at most 128 (llama.cpp's sequence limit, with room for the prefix cache)")
        if self.prefix_cache_tokens is not None and not 0 <= self.prefix_cache_tokens <= 1 << 20:
            raise ValueError("--prefix-cache-tokens must be in 0-1048576")
        for flag, n in (("--threads", self.threads), ("--threads-batch", self.threads_batch)):
            if n is not None and n < 0:
                raise ValueError(f"{flag} must be at least 1 (0 = the default)")
        if self.queue < 0:
            raise ValueError("--queue must be >= 0")
        if not 1 <= self.buffer_mb <= 65536:
            raise ValueError("--buffer-mb must be in 1-65536")
        if self.ctx < 64:
            raise ValueError("--ctx must be at least 64")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be in 0-65535")
        if self.advert_interval <= 0 or self.drain_seconds < 0:
            raise ValueError("--advert-interval must be > 0 and --drain-seconds >= 0")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if self.synthetic is not None and not 0 < len(self.synthetic) <= 128:
            raise ValueError("--synthetic needs a model name of 1-128 characters")
        if self.console_port is not None and not 0 <= self.console_port <= 65535:
            raise ValueError("--console-port must be in 0-65535")
        for url in self.console_entries:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--console-entry needs an entry's base URL (http://host:port), not {url!r}")
        if self.synthetic_rate <= 0:
            raise ValueError("--synthetic-rate must be > 0")
        if not 0 < self.share_rate <= 100_000:
            raise ValueError("--share-rate must be > 0 (MB/s)")


def load_config(path: str | None, overrides: dict) -> NodeConfig:
    return load_settings(NodeConfig, path, "node", overrides)
