"""The service's configuration: one typed, frozen ``Settings``.

Every field is a command-line flag and an environment variable of the same name
(``max_batch_items`` ↔ ``--max-batch-items`` ↔ ``QUOTIENT_MAX_BATCH_ITEMS``). Precedence is
CLI > environment > default. Each field's help states its trade-off; docs/api.md renders the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "Settings",
    "load_settings",
    "resolve_repo_path",
    "settings_table",
    "write_settings_tables",
]

ENV_PREFIX = "QUOTIENT_"
REPO_ROOT = Path(__file__).resolve().parents[2]  # service/quotient_service/config.py → repo


class ConfigError(ValueError):
    """A setting has a bad value; the message names the flag and the variable."""


def _f(default: Any, help: str, choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """All settings of the server. Construct through ``load_settings`` for flags and env vars."""

    # --- network
    host: str = _f("127.0.0.1", "address to bind; 0.0.0.0 exposes the service beyond this host")
    port: int = _f(
        50051, "gRPC port; 0 picks a free one (tests). Never shared with another process"
    )
    max_message_bytes: int = _f(
        16 << 20,
        "largest gRPC message in or out (gRPC refuses a larger one from its length prefix); "
        "larger allows bigger requests but more memory per call",
    )
    health_port: int = _f(
        0,
        "extra plaintext port serving only grpc.health.v1, for probes that cannot do TLS "
        "(Kubernetes gRPC probes); 0 = health on --port only",
    )
    max_connection_age_s: float = _f(
        0.0,
        "close each client connection after this long (clients reconnect, so load spreads "
        "over new pods); 0 = never. Shorter rebalances sooner, costs a reconnect",
    )
    # --- access control (docs/deploy.md)
    api_key_file: str = _f(
        "",
        "file of accepted API keys, one per line ('#' comments), re-read when it changes; "
        "empty = no key needed. Clients send 'authorization: Bearer <key>'",
    )
    tls_cert_file: str = _f(
        "", "PEM certificate chain of the server; set with --tls-key-file to serve TLS only"
    )
    tls_key_file: str = _f("", "PEM private key of --tls-cert-file", secret=True)
    tls_client_ca_file: str = _f(
        "",
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS); "
        "needs --tls-cert-file",
    )
    processes: int = _f(
        1,
        "server processes sharing --port and --health-port (SO_REUSEPORT), each with its own "
        "event loop, GIL and copy of the models: more throughput for small calls arriving on "
        "several connections (the kernel spreads connections, not calls), N x the memory; "
        "limits below hold per process. Embedded backend only",
    )
    # --- models and backend
    backend: str = _f(
        "embedded",
        "where batches run: in-process threads (simple, fast start) or "
        "TorchServe (separate workers, slower start)",
        ("embedded", "torchserve"),
    )
    model_store: str = _f(
        "model_store/models",
        "directory of model directories (model.json each); "
        "relative paths are tried from the cwd, then the repository root",
    )
    models: str = _f(
        "",
        "comma-separated names of the models under --model-store to serve (a pod per model, "
        "or less memory); empty = all of them. An unknown name is a start-up error",
    )
    archive_dir: str = _f(
        "model_store/archives", "directory of TorchServe .mar archives (torchserve backend only)"
    )
    engine: str = _f(
        "onnx",
        "embedded runtime: onnx starts faster and is smaller; torch runs the TorchScript export",
        ("onnx", "torch"),
    )
    device: str = _f(
        "auto",
        "inference device: auto uses CUDA when a GPU and a CUDA runtime are present, else the "
        "CPU; cuda refuses to start without them; cpu is always available",
        ("auto", "cpu", "cuda"),
    )
    model_workers: int = _f(
        1,
        "batches one model runs at once (embedded); more overlaps "
        "batches but splits the CPU between them",
    )
    # --- batching
    max_batch_items: int = _f(
        64, "most items in one model batch; larger raises throughput and latency"
    )
    max_batch_cost: int = _f(
        0,
        "cost budget of one batch (pixels for images, atoms for "
        "molecules); 0 = items only. Bounds memory for large inputs",
    )
    max_batch_delay_ms: float = _f(
        5.0,
        "with model_workers > 1, how long the first item of a further batch waits for "
        "others to fill it while batches run; an idle model runs at once",
    )
    max_queue_items: int = _f(
        1024,
        "items queued across all models before RESOURCE_EXHAUSTED; "
        "higher absorbs bursts, lower sheds load sooner",
    )
    request_timeout_s: float = _f(
        30.0,
        "server-side deadline of a call (the client's is also "
        "honoured); queued items past it are dropped",
    )
    stream_concurrency: int = _f(
        8,
        "requests of one EmbedStream processed at once (answers stay "
        "in order); higher pipelines more, holds more memory",
    )
    # --- input limits
    max_inputs_per_request: int = _f(
        256,
        "most inputs in one request; larger requests amortise overhead but hold a worker longer",
    )
    max_input_bytes: int = _f(8 << 20, "largest encoded input in bytes")
    max_pixels: int = _f(
        4096 * 4096,
        "largest image (width x height) decoded; refuses decompression bombs from the header",
    )
    decode_threads: int = _f(
        2,
        "threads that decode and prepare inputs; more decodes in "
        "parallel but competes with inference for CPU",
    )
    decode_in: str = _f(
        "threads",
        "where inputs are decoded: in the server's threads, or in one worker process per "
        "decode thread (no GIL shared with the server and the model; more memory, a crash "
        "in a decoder fails only its item)",
        ("threads", "processes"),
    )
    idle_direct_bytes: int = _f(
        4096,
        "a call of one input of at most this many bytes (an image also at most 128x128 pixels) "
        "to a model with nothing queued or running is decoded and embedded in the model's "
        "thread in one hand-off, instead of a decode thread then the batch queue (less latency "
        "at idle); 0 = never. Not with decode_in processes",
    )
    max_request_pixels: int = _f(
        64 << 20,
        "most pixels decoded for one request, all its images together (read from their headers "
        "before decoding); bounds the decode time one call can take",
    )
    # --- admission control (docs/security.md): checked before anything is decoded
    max_concurrent_calls: int = _f(
        64,
        "calls the server runs at once (a stream counts once, health and reflection too); "
        "gRPC refuses more with RESOURCE_EXHAUSTED before reading their message. Received "
        "requests hold at most this x --max-message-bytes",
    )
    max_inflight_bytes: int = _f(
        256 << 20,
        "request bytes being served at once across Embed, EmbedStream and Decode; a call over "
        "it is RESOURCE_EXHAUSTED with a retry hint. Higher admits more, holds more memory",
    )
    max_inflight_items: int = _f(
        2048,
        "inputs and Decode rows being served at once, all calls together; a call over it is "
        "RESOURCE_EXHAUSTED with a retry hint (--max-queue-items bounds only the batch queue)",
    )
    # --- operations
    metrics_host: str = _f("127.0.0.1", "address of the Prometheus /metrics endpoint")
    metrics_port: int = _f(9464, "Prometheus /metrics port; 0 disables the endpoint")
    log_level: str = _f("INFO", "logging level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    drain_s: float = _f(
        5.0,
        "on SIGTERM, how long health says NOT_SERVING while calls are still accepted (load "
        "balancers and Kubernetes endpoints notice); SIGINT skips it. Longer is safer, slower",
    )
    shutdown_grace_s: float = _f(
        10.0,
        "after the drain, how long in-flight calls may finish before they are cancelled",
    )
    health_check_interval_s: float = _f(
        2.0,
        "how often health re-checks the backend (a dead TorchServe turns NOT_SERVING); "
        "shorter notices sooner, costs a ping each time",
    )
    # --- TorchServe backend (backends/torchserve.py); ignored by the embedded backend
    torchserve_grpc_port: int = _f(7070, "TorchServe gRPC inference port (loopback)")
    torchserve_grpc_management_port: int = _f(7071, "TorchServe gRPC management port (loopback)")
    torchserve_inference_port: int = _f(8080, "TorchServe HTTP inference port (loopback)")
    torchserve_management_port: int = _f(8081, "TorchServe HTTP management port (loopback)")
    torchserve_metrics_port: int = _f(8082, "TorchServe metrics port (loopback)")
    torchserve_workdir: str = _f(
        "logs/torchserve", "TorchServe's config, logs and model store copy; relative to the cwd"
    )
    torchserve_startup_timeout_s: float = _f(
        180.0,
        "how long to wait for TorchServe and its models before giving up (the JVM starts slowly)",
    )
    torchserve_workers_per_model: int = _f(
        1, "TorchServe workers per model; each is a process holding a copy of the model"
    )
    torchserve_java: str = _f("java", "java binary TorchServe runs with (JAVA_HOME/bin/java)")
    torchserve_token_expiration_min: float = _f(
        60.0,
        "lifetime of TorchServe's inference token in minutes (fractions allowed, at least "
        "2 s); the backend renews it at 80% of that. Shorter limits a leaked token, renews more",
    )
    torchserve_restart_backoff_max_s: float = _f(
        30.0,
        "longest wait before restarting a TorchServe that died (the wait starts at 1 s and "
        "doubles while it keeps dying); shorter recovers sooner, restarts a crash loop more",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_names(f.name)}: must be a finite number, got {value}")
            if choices and value not in choices:
                raise ConfigError(f"{_names(f.name)}: {value!r} is not one of {', '.join(choices)}")
            if f.name.endswith("port") and not 0 <= value <= 65535:
                raise ConfigError(f"{_names(f.name)}: {value} is not a port (0-65535)")
            # zero means "off" for some settings; every other number must be positive
            number = isinstance(value, int | float) and not f.name.endswith("port")
            if number and (value < 0 or (value == 0 and f.name not in _ZERO_ALLOWED)):
                raise ConfigError(f"{_names(f.name)}: must be positive, got {value}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(
                f"{_names('tls_cert_file')} and {_names('tls_key_file')} go together: "
                "set both to serve TLS, or neither"
            )
        if self.processes > 1 and self.backend != "embedded":
            raise ConfigError(
                f"{_names('processes')}: {self.processes} processes need the embedded backend "
                "(each would start its own TorchServe); scale TorchServe with "
                f"{_names('torchserve_workers_per_model')}"
            )
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError(
                f"{_names('tls_client_ca_file')}: mutual TLS needs the server's own certificate "
                f"({_names('tls_cert_file')} and {_names('tls_key_file')})"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict for the log, secrets replaced by ``***``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for f in dataclasses.fields(self):
            if f.metadata["secret"] and values[f.name]:
                values[f.name] = "***"
        return values


_ZERO_ALLOWED = {
    "max_batch_cost",
    "idle_direct_bytes",
    "max_batch_delay_ms",
    "shutdown_grace_s",
    "drain_s",
    "max_connection_age_s",
}


def _names(name: str) -> str:
    return f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}"


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind: type = type(f.default)
    try:
        return kind(raw) if kind is not str else raw
    except ValueError:
        raise ConfigError(f"{_names(f.name)}: expected {kind.__name__}, got {raw!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotient-server",
        description="Quotient gRPC embedding service. Every flag is also an environment variable "
        f"{ENV_PREFIX}<NAME> (CLI > env > default).",
    )
    for f in dataclasses.fields(Settings):
        env = f"{ENV_PREFIX}{f.name.upper()}"
        choices = f.metadata["choices"]
        allowed = f"; one of: {', '.join(choices)}" if choices else ""
        default = repr(f.default) if f.default == "" else f.default
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=env,
            help=f"{f.metadata['help']} (default: {default}{allowed})".replace("%", "%%"),
        )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags (``argv``, default sys.argv) over ``env`` (default os.environ)."""
    args = vars(_parser().parse_args(argv))
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = args[f.name] if args[f.name] is not None else env.get(f"{ENV_PREFIX}{f.name.upper()}")
        if raw is not None:
            values[f.name] = _convert(f, raw)
    return Settings(**values)


def settings_table(torchserve: bool) -> str:
    """docs/api.md's Markdown table of the settings: the TorchServe backend's, or all others
    (``make docs`` writes both into docs/api.md; a test checks they are current)."""
    rows = [
        "| Flag | Environment variable | Default | Meaning and trade-off |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(Settings):
        if f.name.startswith("torchserve_") != torchserve:
            continue
        default = '""' if f.default == "" else str(f.default)
        choices = f.metadata["choices"]
        allowed = f" ({', '.join(f'`{c}`' for c in choices)})" if choices else ""
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | `{default}` | "
            f"{f.metadata['help']}{allowed} |"
        )
    return "\n".join(rows) + "\n"


def write_settings_tables(path: Path) -> None:
    """Replace the two settings tables of docs/api.md (general first, TorchServe second)."""
    lines = path.read_text().splitlines(keepends=True)
    starts = [k for k, line in enumerate(lines) if line.startswith("| Flag | Environment variable")]
    if len(starts) != 2:
        raise ValueError(f"{path}: expected 2 settings tables, found {len(starts)}")
    for start, torchserve in reversed(list(zip(starts, (False, True), strict=True))):
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = [settings_table(torchserve)]
    path.write_text("".join(lines))


def resolve_repo_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one from the cwd if it exists there, else from the
    repository root (so `make serve` works from any directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()
