"""The README's quick start, run as written: its fenced commands from "Run it" to "Test it",
in a fresh folder, against the local-mode `serve` they start.

Two substitutions only, both checked: the install step (`python3 -m venv .venv && .
.venv/bin/activate && pip install '.[local]'`) is this test's own environment, linked as
`.venv` (CI installed it a moment ago, and the install is timed apart); and `<ops token>`
is the token `serve` printed. Port 8000 is the README's, so the commands run in a network
namespace of their own (`unshare --net`, as root, as CI runs) where no other process holds
it.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install '.[local]' && "


def quick_start_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Run it") : text.index("## Test it")]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def script(serve: str, simulate: str, curl: str) -> str:
    """The README's commands, with what this test checks around them."""
    return f"""
ip link set lo up
ln -s {sys.prefix} .venv
setsid bash -c {quote(serve)} > serve.log 2>&1 &
SERVE=$!
for _ in $(seq 1200); do grep -q "Send demo traffic" serve.log && break; sleep 0.1; done
grep -q "Send demo traffic" serve.log
bash -c {quote(simulate)} > simulate.log 2>&1
export OPS=$(sed -n 's/^ *Ops API token: //p' serve.log)
bash -c {quote(curl.replace("<ops token>", "$OPS"))} > renewals.json
curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}' http://127.0.0.1:8000/ > root.txt
curl -s -o /dev/null -w '%{{http_code}}' -d "token=$OPS" http://127.0.0.1:8000/ui/login \
  > login.txt
kill -TERM -- -$SERVE
wait $SERVE || true
"""


def quote(command: str) -> str:
    return "'" + command.replace("'", "'\\''") + "'"


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of its own needs root")
def test_the_readme_quick_start_runs_as_written():
    commands = quick_start_commands()
    assert len(commands) == 3, commands  # install and serve; simulate; read the API
    serve, simulate, curl = commands
    assert serve.startswith(INSTALL) and serve.endswith("coldmail-webhooks serve")
    assert "<ops token>" in curl
    home = Path(tempfile.mkdtemp(prefix="cmw-quickstart-", dir="/tmp"))
    home.chmod(0o755)  # an ordinary folder: local mode refuses private ones
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    steps = script(". .venv/bin/activate && coldmail-webhooks serve", simulate, curl)
    done = subprocess.run(
        ["unshare", "--net", "bash", "-euo", "pipefail", "-c", steps],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = {name: (home / name).read_text() for name in ("serve.log", "simulate.log")}
    assert done.returncode == 0, (done.stderr, logs)
    assert "open http://127.0.0.1:8000/ui" in logs["simulate.log"], logs
    assert "violations            0" in logs["simulate.log"]
    renewals = orjson.loads((home / "renewals.json").read_bytes())
    assert {"past_due", "cancelled"} <= {r for item in renewals["items"] for r in item["risks"]}
    assert (home / "root.txt").read_text() == "307 http://127.0.0.1:8000/ui"
    assert (home / "login.txt").read_text() == "303"  # signed in with the printed token
    assert "Dashboard: http://127.0.0.1:8000/ui" in logs["serve.log"]
    assert "Send demo traffic: coldmail-webhooks simulate\n" in logs["serve.log"]
    shutil.rmtree(home, ignore_errors=True)
