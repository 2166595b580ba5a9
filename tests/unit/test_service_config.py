"""Settings: defaults, CLI > env > default, clear errors for bad values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from quotient_service.config import (
    REPO_ROOT,
    ConfigError,
    Settings,
    _parser,
    load_settings,
    resolve_repo_path,
)


def test_defaults():
    s = load_settings([], env={})
    assert s == Settings()
    assert (s.host, s.port, s.backend, s.engine, s.device) == (
        "127.0.0.1",
        50051,
        "embedded",
        "onnx",
        "auto",
    )
    assert (s.max_batch_items, s.max_queue_items, s.max_inputs_per_request) == (64, 1024, 256)
    assert (s.max_input_bytes, s.max_pixels, s.max_message_bytes) == (8 << 20, 16777216, 16 << 20)
    assert (s.metrics_port, s.torchserve_grpc_port, s.torchserve_startup_timeout_s) == (
        9464,
        7070,
        180.0,
    )


def test_env_overrides_default_and_cli_overrides_env():
    env = {
        "QUOTIENT_MAX_BATCH_ITEMS": "32",
        "QUOTIENT_BACKEND": "torchserve",
        "QUOTIENT_MAX_BATCH_DELAY_MS": "2.5",
    }
    s = load_settings([], env=env)
    assert (s.max_batch_items, s.backend, s.max_batch_delay_ms) == (32, "torchserve", 2.5)
    s = load_settings(["--max-batch-items", "8", "--backend", "embedded"], env=env)
    assert (s.max_batch_items, s.backend, s.max_batch_delay_ms) == (8, "embedded", 2.5)


def test_every_field_is_a_flag_and_an_env_var_with_help():
    help_text = _parser().format_help()
    for f in dataclasses.fields(Settings):
        assert f"--{f.name.replace('_', '-')}" in help_text
        assert f"QUOTIENT_{f.name.upper()}" in help_text
        assert f.metadata["help"], f.name


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch-items", "many"], {}, "--max-batch-items / QUOTIENT_MAX_BATCH_ITEMS"),
        ([], {"QUOTIENT_PORT": "x"}, "expected int"),
        (["--engine", "tensorrt"], {}, "not one of onnx, torch"),
        ([], {"QUOTIENT_BACKEND": "triton"}, "not one of embedded, torchserve"),
        (["--port", "70000"], {}, "not a port"),
        (["--max-queue-items", "0"], {}, "must be positive"),
        (["--request-timeout-s", "-1"], {}, "must be positive"),
    ],
)
def test_bad_values_name_the_setting(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(argv, env=env)


def test_zero_is_allowed_where_it_means_off():
    s = load_settings(["--max-batch-delay-ms", "0", "--metrics-port", "0", "--port", "0"], env={})
    assert (s.max_batch_delay_ms, s.metrics_port, s.port) == (0.0, 0, 0)


def test_settings_are_frozen_and_redacted_dict_is_complete():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    assert set(s.redacted()) == {f.name for f in dataclasses.fields(Settings)}


def test_relative_model_store_resolves_from_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_repo_path("model_store/models") == REPO_ROOT / "model_store" / "models"
    (tmp_path / "here").mkdir()
    assert resolve_repo_path("here") == tmp_path / "here"
    assert resolve_repo_path(Path("/abs/x")) == Path("/abs/x")


def test_docs_api_lists_every_setting():
    from quotient_service.config import settings_table

    text = (REPO_ROOT / "docs" / "api.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`--{f.name.replace('_', '-')}` | `QUOTIENT_{f.name.upper()}`" in text, f.name
    for torchserve in (False, True):  # current, as `make docs` writes them
        assert settings_table(torchserve) in text, "run `make docs`"


def test_docs_api_carries_the_image_input_policy():
    from quotient_models.images import preprocess

    def words(s: str) -> str:
        return " ".join(s.replace("`", "").split())

    policy = preprocess.__doc__.split("Policy, in order:", 1)[1]
    assert words(policy) in words((REPO_ROOT / "docs" / "api.md").read_text())


def test_models_serves_the_named_models_in_order_and_refuses_an_unknown_one(
    three_model_store: Path,
) -> None:
    from quotient_service.backends.base import served_specs
    from quotient_service.errors import StartupError

    store = {"model_store": str(three_model_store)}
    every = [s.name for s in served_specs(Settings(**store))]
    assert every == ["tiny-a", "tiny-b", "tiny-c"]
    chosen = served_specs(
        load_settings(["--models", "tiny-c, tiny-a,tiny-c"], env=store_env(store))
    )
    assert [s.name for s in chosen] == ["tiny-c", "tiny-a"]
    with pytest.raises(
        StartupError,
        match=r"--models / QUOTIENT_MODELS: 'tiny-x' not under .*"
        r"\(it holds tiny-a, tiny-b, tiny-c\)",
    ):
        served_specs(Settings(models="tiny-a,tiny-x", **store))


def store_env(settings: dict[str, str]) -> dict[str, str]:
    return {f"QUOTIENT_{k.upper()}": v for k, v in settings.items()}
