"""Settings: read from the environment, validated at start-up, and documented from their own definitions."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import Settings, describe_markdown
from backend.errors import SettingsError

REPO = Path(__file__).resolve().parents[1]


def test_configuration_doc_is_generated_from_the_settings() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == describe_markdown(), "run: python -m backend settings --markdown > docs/configuration.md"


def test_every_setting_has_its_own_variable_and_a_meaning() -> None:
    definitions = dataclasses.fields(Settings)
    names = [definition.metadata["env"] for definition in definitions]
    assert len(names) == len(set(names))
    assert all(definition.metadata["doc"] for definition in definitions)
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "MODEL_DIR"):
        assert name in names
    for name in ("WORKERS", "THREADS", "LOG_LEVEL"):
        assert name in names


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("SAM_MODEL_TYPE", "vit_x", "vit_b, vit_l, vit_h"),
        ("DECODER_RUNTIME", "tensorrt", "auto, onnx, torch"),
        ("INFERENCE", "remote", "local, queue"),
        ("DEVICE", "gpu", "`cuda:N`"),
        ("LOG_LEVEL", "chatty", "DEBUG, INFO"),
        ("WORKERS", "0", "at least 1"),
        ("PORT", "http", "an integer"),
        ("INTERACTIVE_THREAD", "maybe", "true or false"),
        ("INFERENCE", "queue", "needs REDIS_URL"),
    ],
)
def test_an_unusable_value_names_the_variable_and_what_it_accepts(variable: str, value: str, named: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({variable: value})
    assert variable in str(refused.value) and named in str(refused.value)


def test_values_are_parsed_and_an_empty_variable_means_unset() -> None:
    settings = Settings.from_env(
        {
            "GROUNDING_DINO_TEXT_ENCODER": "  ",
            "DEVICE": "cuda:1",
            "INFERENCE": "Queue",
            "REDIS_URL": "redis://cache:6379/0",
            "ALLOWED_IMAGE_HOSTS": "Images.Example.com, cdn.example.com",
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "PREDICT_DEADLINE": "12.5",
            "INTERACTIVE_THREAD": "off",
        }
    )
    assert settings.grounding_dino_text_encoder == Settings.grounding_dino_text_encoder
    assert settings.device == "cuda:1" and settings.inference == "queue"
    assert settings.allowed_image_hosts == ("images.example.com", "cdn.example.com")
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.predict_deadline_s == 12.5 and settings.interactive_thread is False


def test_secrets_stay_out_of_the_settings_repr_and_summary() -> None:
    settings = Settings(
        label_studio_api_key="key-123", basic_auth_user="ls", basic_auth_pass="pw-456", bearer_token="tok-789"
    )
    text = repr(settings)
    output = subprocess.run(
        [sys.executable, "-m", "backend", "settings"],
        cwd=REPO,
        env={"LABEL_STUDIO_API_KEY": "key-123", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for secret in ("key-123", "pw-456", "tok-789"):
        assert secret not in text and secret not in output
    assert '"SAM_MODEL_TYPE": "vit_b"' in output


def test_hf_token_is_checked_at_start_up_without_being_echoed() -> None:
    token = "hf_" + "aB3" * 11
    settings = Settings.from_env({"HF_TOKEN": token})
    assert settings.hf_token == token and token not in repr(settings)
    assert Settings.from_env({}).hf_token == ""  # the default: no token
    with pytest.raises(SettingsError, match="HF_TOKEN got a value; it accepts a Hugging Face access token") as refused:
        Settings.from_env({"HF_TOKEN": "Bearer " + token})
    assert token not in str(refused.value)


def test_gunicorn_refuses_to_start_with_an_unusable_setting() -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    started = subprocess.run(
        [str(gunicorn), "-c", "gunicorn.conf.py", "--check-config", "backend.wsgi:app"],
        cwd=REPO,
        env={"INFERENCE": "remote", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    assert "INFERENCE must be one of local, queue" in started.stderr + started.stdout
