"""The one line an operator reads when start-up refuses its configuration, exactly: which
variable, what is wrong, and how to fix it."""

import pytest

from app.config import ConfigError, Settings, load_settings
from tests.conftest import FERNET_KEY

HOOK, OPS, CREDS, METRICS = (f"{role}-token-0123456789" for role in ("hook", "ops", "cred", "met"))
COMPLETE = {
    "_env_file": None,
    "database_url": "postgres://u:p@db:5432/app",
    "fernet_keys": FERNET_KEY,
    "ops_api_tokens": OPS,
    "webhook_tokens": HOOK,
    "credentials_api_tokens": CREDS,
    "metrics_token": METRICS,
}


def refusal(**changes: object) -> str:
    values = {k: v for k, v in (COMPLETE | changes).items() if v is not None}
    with pytest.raises(ConfigError) as error:
        settings: Settings = load_settings(**values)
        settings.check_complete()
    return str(error.value)


def test_a_complete_configuration_starts():
    load_settings(**COMPLETE).check_complete()
    load_settings(**COMPLETE | {"cmr_signature_mode": "report"}).check_complete()


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"database_url": None}, "DATABASE_URL is not set"),
        (
            {"fernet_keys": None},
            "FERNET_KEYS is not set (make a key: coldmail-webhooks generate-key)",
        ),
        ({"ops_api_tokens": None}, "OPS_API_TOKENS is not set"),
        (
            {"webhook_tokens": None},
            "WEBHOOK_TOKENS is not set: without a token the service would read every "
            "stranger's body before refusing it",
        ),
        (
            {"webhook_tokens": None, "cmr_signing_key": "cmr-key-0123456789"},
            "WEBHOOK_TOKENS is not set: without a token the service would read every "
            "stranger's body before refusing it",
        ),
        (
            {"database_url": "mysql://h/db"},
            "DATABASE_URL: Value error, must start with postgres://, postgresql:// or "
            "postgresql+asyncpg://",
        ),
    ],
)  # fmt: skip
def test_a_refused_configuration_says_which_variable_in_one_line(changes, line):
    assert refusal(**changes) == line


SHORT = "fifteen-chars-x"  # one under the minimum


@pytest.mark.parametrize(
    ("variable", "field", "value"),
    [
        ("WEBHOOK_TOKENS", "webhook_tokens", f"{HOOK}, {SHORT}"),
        ("OPS_API_TOKENS", "ops_api_tokens", SHORT),
        ("CREDENTIALS_API_TOKENS", "credentials_api_tokens", f"{CREDS},{SHORT}"),
        ("METRICS_TOKEN", "metrics_token", SHORT),
    ],
)
def test_a_token_under_sixteen_characters_is_refused_naming_its_variable(variable, field, value):
    assert len(SHORT) == 15
    assert refusal(**{field: value}) == (
        f"{variable}: every token must be at least 16 characters (make one: openssl rand -hex 24)"
    )
    load_settings(**COMPLETE | {field: value.replace(SHORT, SHORT + "y")}).check_complete()


@pytest.mark.parametrize(
    ("field", "variable", "value"),
    [
        ("ops_api_tokens", "OPS_API_TOKENS", f"another-token-0123456, {HOOK}"),
        ("credentials_api_tokens", "CREDENTIALS_API_TOKENS", f"{HOOK},another-token-0123456"),
        ("metrics_token", "METRICS_TOKEN", HOOK),
    ],
)
def test_one_token_in_two_roles_is_refused_naming_both(field, variable, value):
    assert refusal(**{field: value}) == (
        f"{variable}: a token is also configured in WEBHOOK_TOKENS; give each role its own"
    )


def test_a_blank_metrics_token_leaves_metrics_open_and_clashes_with_nothing():
    settings = load_settings(**COMPLETE | {"metrics_token": "   "})
    settings.check_complete()
    assert settings.metrics_token_value is None
