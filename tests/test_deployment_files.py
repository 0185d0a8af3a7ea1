"""What can be checked of the container setup without a Docker engine."""

import re
from pathlib import Path

import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def env_example_names() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z_]+=", line)}


def test_env_example_lists_every_setting_once():
    names = env_example_names()
    assert {name.upper() for name in Settings.model_fields} <= names


def test_compose_parses_and_passes_every_variable_to_the_app():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    app, db = compose["services"]["app"], compose["services"]["db"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert "healthcheck" in db and "pgdata" in compose["volumes"]
    passed = set(app["environment"]) | {"POSTGRES_PASSWORD"}
    assert env_example_names() <= passed
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "FERNET_KEYS", "OPS_API_TOKENS"):
        assert "${" + secret + ":?" in text  # compose refuses to start without it


def test_dockerfile_runs_as_non_root_with_a_health_check_and_serve():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2  # multi-stage
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert '"serve", "--host", "0.0.0.0"' in text
    # dependencies are installed before the source is copied, for layer caching
    assert text.index("pip install .") < text.index("COPY app ./app")
