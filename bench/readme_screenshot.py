"""Take docs/dashboard.png, the README's screenshot: a fresh local-mode `serve`, the story
`simulate` tells, and the overview in headless Chromium (Debian's chromium and
chromium-driver, as the browser tests use).

    python bench/readme_screenshot.py [--out docs/dashboard.png]
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser.conftest import CHROMEDRIVER, CHROMIUM  # noqa: E402
from tests.servers import CLI, clean_env, serving  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cmw-screenshot-", dir="/tmp"))
    home.chmod(0o755)  # local mode refuses private folders
    env = clean_env(DATA_DIR=str(home / "data"))
    with serving(env, home) as server:
        ops = re.search(r"Ops API token: (\S+)", server.output())
        assert ops, server.output()
        told = [*CLI, "simulate", f"{server.url}/webhooks/cmr", "--quiet"]
        subprocess.run(told, env=env, cwd=home, check=True, timeout=120)
        shoot(server.url, ops.group(1), args.out, (args.width, args.height))
    print(f"wrote {args.out}")


def shoot(url: str, token: str, out: Path, size: tuple[int, int]) -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.get(f"{url}/ui/login")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        WebDriverWait(driver, 15).until(lambda d: d.title.startswith("Overview"))
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
