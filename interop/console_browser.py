"""The web console in a real browser: headless Chromium driven over WebDriver (Selenium).

Usage: python interop/console_browser.py PATH/TO/msbd SCREENSHOT_DIR

It starts `msbd serve --transport http` on a fresh data directory with an agent token
(MSB_AUTH_TOKEN) and an operator token (MSB_OPERATOR_TOKEN), signs in to /ui as the operator,
has an agent submit a command over MCP (the official Python SDK, streamable HTTP), and checks
in the page: the task appears in the list without a reload, its progress bar moves, its output
appears live on its page, Cancel stops it (and its process is gone from the host), a
supervised loop is paused and resumed from the page; then, outside the browser, that an action
without the CSRF token, from another origin, or with another login's token is refused, and that
the agent may not act on the loops. Screenshots of the main pages go to SCREENSHOT_DIR.
Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`); `.ci/run` installs
them. Exits non-zero on the first failure. `cargo xtask ci` runs it.
"""

import asyncio
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid

from mcp import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

AGENT = "agent-token-" + uuid.uuid4().hex
OPERATOR = "operator-token-" + uuid.uuid4().hex


def check(condition, message):
    if not condition:
        raise SystemExit(f"console FAILED: {message}")


def wait_for(what, condition, within=20.0):
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as error:  # the page may be between two renders
            last = error
        time.sleep(0.05)
    raise SystemExit(f"console FAILED: {what} (within {within} s; last seen: {last!r})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def submit(base, command):
    headers = {"Authorization": f"Bearer {AGENT}"}
    async with create_mcp_http_client(headers=headers) as client, \
            streamable_http_client(f"{base}/mcp", http_client=client) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool(
                "create_background_task",
                {"task_type": "command", "parameters": {"command": command}},
            )
            check(not result.is_error, f"create_background_task failed: {result.content}")
            return result.structured_content["task_id"]


def request(port, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read().decode()
    connection.close()
    return response, data


def login(port, token):
    body = urllib.parse.urlencode({"token": token})
    response, _ = request(port, "POST", "/ui/login", body, {
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": f"http://127.0.0.1:{port}",
        "Host": f"127.0.0.1:{port}",
    })
    check(response.status == 303, f"login answered {response.status}")
    cookie = response.getheader("Set-Cookie").split(";")[0]
    return cookie


def csrf_of(port, cookie, path="/ui/supervision"):
    response, page = request(port, "GET", path, headers={"Cookie": cookie})
    check(response.status == 200, f"GET {path} answered {response.status}")
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    check(match, f"no CSRF token on {path}")
    return match.group(1)


def post(port, path, cookie, csrf=None, origin=None):
    form = {"go": "1"}
    if csrf is not None:
        form["csrf"] = csrf
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
    if origin is not None:
        headers["Origin"] = origin
    return request(port, "POST", path, urllib.parse.urlencode(form), headers)


def loop_state(driver, name):
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-loop="{name}"] td.state').text


def main(msbd, shots):
    os.makedirs(shots, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix="msbd-console-")
    env = dict(os.environ)
    env.update({
        "MSB_DATA_DIR": data_dir,
        "MSB_AUTH_TOKEN": AGENT,
        "MSB_OPERATOR_TOKEN": OPERATOR,
        "MSB_LOG_LEVEL": env.get("MSB_LOG_LEVEL", "warn"),
    })
    daemon = subprocess.Popen(
        [msbd, "serve", "--transport", "http", "--listen", f"127.0.0.1:{port}"], env=env)
    driver = None
    try:
        wait_for("msbd answers /healthz", lambda: request(port, "GET", "/healthz")[0].status == 200)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", "--disable-gpu"]:
            options.add_argument(argument)
        service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
        driver = webdriver.Chrome(service=service, options=options)
        print(f"browser: {driver.capabilities.get('browserName')} {driver.capabilities.get('browserVersion')}")

        # Signing in.
        driver.get(f"{base}/ui")
        wait_for("the console asks to sign in", lambda: driver.current_url.endswith("/ui/login"))
        driver.save_screenshot(os.path.join(shots, "login.png"))
        driver.find_element(By.ID, "token").send_keys("not-the-token")
        driver.find_element(By.ID, "sign-in").click()
        wait_for("a wrong token is refused", lambda: "not msbd's" in driver.find_element(By.ID, "flash").text)
        driver.find_element(By.ID, "token").send_keys(OPERATOR)
        driver.find_element(By.ID, "sign-in").click()
        wait_for("the operator lands on the task list", lambda: driver.current_url.endswith("/ui/tasks"))
        check(driver.find_element(By.ID, "principal").text == "operator", "not signed in as the operator")
        cookie = next(c for c in driver.get_cookies() if c["name"] == "msbd_console")
        check(cookie["httpOnly"] and cookie.get("sameSite") == "Strict",
              f"the session cookie is not HttpOnly and SameSite=Strict: {cookie}")
        wait_for("the live event stream connects", lambda: driver.find_element(By.ID, "live").text == "live")
        driver.execute_script("window.__notReloaded = true;")

        # A task appears and moves without a reload.
        driver.save_screenshot(os.path.join(shots, "tasks-empty.png"))
        marker = "console-" + uuid.uuid4().hex[:12]
        command = (f"for i in $(seq 1 60); do echo \"line $i {marker}\"; "
                   f"echo \"::progress:: $((i*100/60)) step $i of 60\"; "
                   f"echo \"warning $i\" >&2; sleep 0.25; done")
        task_id = asyncio.run(submit(base, command))
        print(f"submitted {task_id}")
        row = f'tr[data-task-id="{task_id}"]'
        wait_for("the new task appears in the list", lambda: driver.find_elements(By.CSS_SELECTOR, row))
        seen_values = []

        def moving():
            bar = driver.find_element(By.CSS_SELECTOR, f"{row} progress")
            status = driver.find_element(By.CSS_SELECTOR, f"{row} .status").text
            value = float(bar.get_attribute("value"))
            if status == "running" and 0 < value < 100 and (not seen_values or value > seen_values[-1]):
                seen_values.append(value)
            return len(seen_values) >= 3

        wait_for("its progress bar moves while it runs", moving)
        first = seen_values
        print(f"progress seen moving from {first}")
        check(driver.execute_script("return window.__notReloaded === true;"), "the task list was reloaded")
        driver.save_screenshot(os.path.join(shots, "tasks.png"))

        # Its page: the output follows as it is written, stdout and stderr apart.
        driver.find_element(By.CSS_SELECTOR, f"{row} a.id").click()
        wait_for("the task page opens", lambda: driver.find_elements(By.ID, "out-stdout"))
        driver.execute_script("window.__notReloaded = true;")

        def last_line():
            numbers = re.findall(r"line (\d+) ", driver.find_element(By.ID, "out-stdout").text)
            return int(numbers[-1]) if numbers else 0

        seen = wait_for("output appears on the task page", last_line)
        wait_for("more output appears live", lambda: last_line() >= seen + 3)
        check("warning" in driver.find_element(By.ID, "out-stderr").text, "stderr is not shown apart")
        check("line" not in driver.find_element(By.ID, "out-stderr").text, "stdout leaked into stderr")
        check(driver.execute_script("return window.__notReloaded === true;"), "the task page was reloaded")
        driver.save_screenshot(os.path.join(shots, "task.png"))

        # Cancel from the page: the task ends and its process is gone.
        check(subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0,
              "the task's process is not running before the cancel")
        driver.find_element(By.CSS_SELECTOR, 'form[action$="/cancel"] button').click()
        driver.switch_to.alert.accept()
        wait_for("the task is cancelled", lambda: driver.find_element(By.ID, "task-status").text == "cancelled")
        wait_for("the task's process is gone",
                 lambda: subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1)

        # Pause and resume a supervised loop.
        driver.get(f"{base}/ui/supervision")
        loop = "retention_pruner"
        wait_for("the loop runs", lambda: loop_state(driver, loop) == "running")
        driver.find_element(By.CSS_SELECTOR, f'tr[data-loop="{loop}"] form[action$="/pause"] button').click()
        wait_for("the loop is paused", lambda: loop_state(driver, loop) == "paused")
        driver.save_screenshot(os.path.join(shots, "supervision.png"))
        driver.find_element(By.CSS_SELECTOR, f'tr[data-loop="{loop}"] form[action$="/resume"] button').click()
        wait_for("the loop runs again", lambda: loop_state(driver, loop) == "running")

        driver.get(f"{base}/ui/queue")
        wait_for("the queue page shows", lambda: driver.find_elements(By.ID, "by-type"))
        caption = driver.find_element(By.CSS_SELECTOR, "#chart-throughput").find_element(By.XPATH, "..").text
        check(re.search(r"\(([1-9]\d*) in all", caption), f"the throughput chart counts no finished task: {caption!r}")
        check(driver.find_elements(By.CSS_SELECTOR, "#chart-latency circle.dot"), "the latency chart has no point")
        # The concurrency limit, set from the page.
        field = driver.find_element(By.ID, "limit-all")
        field.clear()
        field.send_keys("6")
        driver.find_element(By.ID, "set-limit-all").click()
        wait_for("the limit is set", lambda: driver.find_element(By.ID, "q-max_concurrent").text == "6")
        driver.save_screenshot(os.path.join(shots, "queue.png"))

        # A live session: what its sandbox uses.
        asyncio.run(submit(base, "sleep 20 & sleep 20; wait"))
        driver.get(f"{base}/ui/sessions")

        def session_processes():
            driver.refresh()
            for row in driver.find_elements(By.CSS_SELECTOR, "#sessions tbody tr"):
                if row.find_elements(By.CSS_SELECTOR, ".status.s-running"):
                    return row.find_element(By.CSS_SELECTOR, "td.processes").text
            return None
        processes = wait_for("a live session is listed with its processes", session_processes)
        isolation = driver.find_element(By.ID, "isolation").text
        print(f"session: isolation {isolation!r}, processes {processes!r}")
        if "cgroup" in isolation:
            check(processes.isdigit() and int(processes) >= 2, f"the session's processes: {processes!r}")
        driver.save_screenshot(os.path.join(shots, "sessions.png"))

        # Refusals, outside the browser, with the browser's own login.
        operator_cookie = f"msbd_console={cookie['value']}"
        operator_csrf = csrf_of(port, operator_cookie)
        origin = base
        path = f"/ui/supervision/{loop}/pause"
        response, _ = post(port, path, operator_cookie, csrf=None, origin=origin)
        check(response.status == 403, f"a POST without a CSRF token answered {response.status}")
        response, _ = post(port, path, operator_cookie, csrf="0" * 32, origin=origin)
        check(response.status == 403, f"a POST with a made-up CSRF token answered {response.status}")
        response, _ = post(port, path, operator_cookie, csrf=operator_csrf, origin="http://evil.example")
        check(response.status == 403, f"a POST from another origin answered {response.status}")
        response, _ = post(port, path, operator_cookie, csrf=operator_csrf, origin=None)
        check(response.status == 403, f"a POST without an Origin answered {response.status}")
        agent_cookie = login(port, AGENT)
        agent_csrf = csrf_of(port, agent_cookie)
        check(agent_csrf != operator_csrf, "two logins share a CSRF token")
        response, _ = post(port, path, agent_cookie, csrf=operator_csrf, origin=origin)
        check(response.status == 403, f"the agent's login with the operator's CSRF token answered {response.status}")
        response, _ = post(port, path, agent_cookie, csrf=agent_csrf, origin=origin)
        check(response.status == 303 and "FORBIDDEN" in urllib.parse.unquote_plus(response.getheader("Location")),
              f"the agent paused a loop: {response.status} {response.getheader('Location')}")
        driver.get(f"{base}/ui/supervision")
        check(loop_state(driver, loop) == "running", "a refused action changed the loop")
        print("ok: sign-in, live list and progress, live output, cancel, loop pause/resume, refusals")
    except BaseException:
        if driver is not None:
            driver.save_screenshot(os.path.join(shots, "failure.png"))
            print(f"page at the failure: {driver.current_url}")
            print(driver.find_element(By.TAG_NAME, "body").text[:3000])
        raise
    finally:
        if driver is not None:
            driver.quit()
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
