"""Captures the real answers of msbd's MCP tools, for the examples in docs/tools.md.

Usage: python3 interop/capture_examples.py PATH/TO/msbd [OUT.json]

It starts `msbd serve` (stdio, newline-delimited JSON-RPC) on a fresh data directory, with one
read-only volume mapped, calls every tool (and every action of the `manage_*` tools) once or
more, triggers the tool errors that can be triggered, then starts msbd again on the same data
directory as a client that declares the MCP tasks extension and uses `tasks/get` and
`tasks/cancel`, and finally starts `msbd serve --transport http` to record which tools an HTTP
client is offered (skipped with a warning if the HTTP transport does not start). Every request
and its answer (and the notifications received meanwhile) are printed and written to OUT.json
(default: examples.json), in the order they happened. Only the Python standard library is used.
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import socket
import threading
import time
import urllib.error
import urllib.request

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"


class Msbd:
    """One `msbd serve` process: one stdio MCP connection."""

    def __init__(self, binary, env, capabilities, log):
        self.proc = subprocess.Popen(
            [binary, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            bufsize=1,
        )
        self.messages = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        init = self.request("initialize", {
            "protocolVersion": "2025-11-25",
            "capabilities": capabilities,
            "clientInfo": {"name": "capture-examples", "version": "0.0.0"},
        })
        self.init = init
        self.notify("notifications/initialized")

    def _read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                self.messages.put(json.loads(line))

    def notify(self, method, params=None):
        message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def request(self, method, params, timeout=120):
        """Sends a request; returns (response, notifications received before it)."""
        self.next_id += 1
        rid = self.next_id
        message = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        notes = []
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise SystemExit(f"no answer to {method} {params} in {timeout} s")
            msg = self.messages.get(timeout=left)
            if msg.get("id") == rid and "method" not in msg:
                return msg, notes
            notes.append(msg)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


RECORDS = []


def record(kind, name, params, response, notes):
    entry = {"kind": kind, "name": name, "params": params, "response": response}
    if notes:
        entry["notifications"] = notes
    RECORDS.append(entry)
    print(f"===== {kind} {name}")
    print(json.dumps(params, indent=2))
    print("-----")
    print(json.dumps(response, indent=2)[:6000])
    for note in notes:
        print("note:", json.dumps(note))
    print()


def call(m, tool, arguments, label=None, meta=None):
    params = {"name": tool, "arguments": arguments}
    if meta:
        params["_meta"] = meta
    response, notes = m.request("tools/call", params)
    record("tool", label or tool, arguments, response, notes)
    result = response.get("result", {})
    return result.get("structuredContent") or {}, result


def rpc(m, method, params, label=None):
    response, notes = m.request(method, params)
    record("rpc", label or method, params, response, notes)
    return response


def wait_status(m, task_id, statuses, timeout=60):
    """Polls (unrecorded) until the task is in one of the statuses."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        response, _ = m.request("tools/call", {
            "name": "check_task_status", "arguments": {"task_id": task_id}})
        status = response["result"].get("structuredContent", {}).get("status")
        if status in statuses:
            return status
        time.sleep(0.2)
    raise SystemExit(f"task {task_id} never reached {statuses}")


def first_connection(binary, env, log):
    m = Msbd(binary, env, {}, log)
    record("rpc", "initialize", {}, {"result": m.init[0]["result"]}, [])
    rpc(m, "tools/list", {})

    # --- background tasks -------------------------------------------------------------------
    created, _ = call(m, "submit_task", {
        "task_type": "command",
        "params": {"command": "echo building; echo '::progress:: 40 compiling'; sleep 3; echo '::progress:: 90 linking'; sleep 1; echo done"},
        "priority": "high",
        "timeout_seconds": 120,
        "tags": ["build"],
    })
    build = created["task_id"]
    wait_status(m, build, {"running"})
    time.sleep(0.5)
    call(m, "check_task_status", {"task_id": build})
    call(m, "read_task_output", {"task_id": build, "cursor": 0}, label="read_task_output (while running)")
    done, _ = call(m, "get_task_result", {"task_id": build, "wait": True, "timeout": 60},
                   label="get_task_result (wait, with progress token)", meta={"progressToken": "build-1"})
    build_session = done["result"]["session_id"]
    call(m, "read_task_output", {"task_id": build, "cursor": 0, "max_bytes": 9}, label="read_task_output (max_bytes)")
    call(m, "read_task_output", {"task_id": build, "cursor": 9}, label="read_task_output (to the end)")

    created, _ = call(m, "create_background_task", {
        "task_type": "code",
        "params": {"language": "python", "code": "import math\nprint(math.factorial(20))"},
        "idempotency_key": "factorial-20",
    })
    code_task = created["task_id"]
    call(m, "create_background_task", {
        "task_type": "code",
        "params": {"language": "python", "code": "import math\nprint(math.factorial(20))"},
        "idempotency_key": "factorial-20",
    }, label="create_background_task (same idempotency_key)")
    wait_status(m, code_task, {"completed", "failed"})
    call(m, "get_task_result", {"task_id": code_task}, label="get_task_result (code task)")

    created, _ = call(m, "submit_task", {
        "task_type": "command", "params": {"command": "sleep 600"}}, label="submit_task (sleep)")
    sleeper = created["task_id"]
    wait_status(m, sleeper, {"running"})
    call(m, "get_task_result", {"task_id": sleeper}, label="get_task_result (running, no wait)")
    call(m, "cancel_task", {"task_id": sleeper})
    time.sleep(1)
    call(m, "cancel_task", {"task_id": sleeper}, label="cancel_task (already finished)")
    call(m, "check_task_status", {"status_filter": "completed", "limit": 5}, label="check_task_status (list)")
    call(m, "list_tasks", {"limit": 2}, label="list_tasks (page 1)")
    listed, _ = call(m, "list_tasks", {"tag": "build"}, label="list_tasks (tag)")

    # --- manage_background_tasks ----------------------------------------------------------------
    mb = "manage_background_tasks"
    call(m, mb, {"action": "list_types"}, label=f"{mb} list_types")
    answer, _ = call(m, mb, {
        "action": "create", "task_type": "command",
        "parameters": {"command": "echo created by manage_background_tasks"},
        "priority": 7, "task_config": {"timeout_seconds": 60, "max_retries": 2, "tags": ["demo"]},
    }, label=f"{mb} create")
    answer, _ = call(m, mb, {
        "action": "schedule", "task_type": "command",
        "parameters": {"command": "echo later"}, "delay_seconds": 3600,
    }, label=f"{mb} schedule")
    scheduled = answer["task_id"]
    call(m, mb, {"action": "pause", "task_id": scheduled}, label=f"{mb} pause")
    call(m, mb, {"action": "resume", "task_id": scheduled}, label=f"{mb} resume")
    call(m, mb, {"action": "cancel", "task_id": scheduled}, label=f"{mb} cancel")
    call(m, "read_task_output", {"task_id": scheduled}, label="read_task_output (never started)")
    failed, _ = call(m, "submit_task", {"task_type": "command", "params": {"command": "echo checking; exit 2"}},
                     label="submit_task (fails)")
    wait_status(m, failed["task_id"], {"failed"})
    call(m, "get_task_result", {"task_id": failed["task_id"]}, label="get_task_result (failed)")
    call(m, mb, {"action": "retry", "task_id": failed["task_id"]}, label=f"{mb} retry")
    call(m, mb, {"action": "list", "status": "active", "limit": 5}, label=f"{mb} list")
    call(m, mb, {"action": "get_stats"}, label=f"{mb} get_stats")
    call(m, mb, {"action": "cleanup", "task_type": "code", "older_than_seconds": 0}, label=f"{mb} cleanup")

    # --- manage_task_queue ------------------------------------------------------------------------
    mq = "manage_task_queue"
    call(m, mq, {"action": "pause"}, label=f"{mq} pause")
    a, _ = call(m, "submit_task", {"task_type": "command", "params": {"command": "echo one"}, "priority": "low"},
                label="submit_task (queue paused)")
    b, _ = call(m, "submit_task", {"task_type": "command", "params": {"command": "echo two"}}, label="submit_task (queue paused 2)")
    call(m, mq, {"action": "get_stats"}, label=f"{mq} get_stats")
    call(m, mq, {"action": "reorder", "task_id": a["task_id"], "priority": "critical"}, label=f"{mq} reorder")
    call(m, mq, {"action": "clear_queue", "priority": "normal"}, label=f"{mq} clear_queue")
    call(m, mq, {"action": "resume"}, label=f"{mq} resume")
    call(m, mq, {"action": "resume"}, label=f"{mq} resume (again)")
    call(m, mq, {"action": "set_limits", "max_concurrent": 8}, label=f"{mq} set_limits")
    call(m, mq, {"action": "set_limits", "task_type": "code", "max_concurrent": 2}, label=f"{mq} set_limits (type)")
    call(m, mq, {"action": "pause", "task_type": "code"}, label=f"{mq} pause (type)")
    call(m, mq, {"action": "resume", "task_type": "code"}, label=f"{mq} resume (type)")

    # --- sandbox tools ---------------------------------------------------------------------------
    first, _ = call(m, "execute_code", {"code": "x = 6 * 7\nprint(x)", "template": "python"})
    session = first.get("session_id")
    call(m, "execute_code", {"code": "print(x + 1)", "session_id": session}, label="execute_code (same session)")
    call(m, "execute_command", {"command": "ls /shared; echo hi > notes.txt; cat notes.txt", "session_id": session, "timeout": 30})
    oops, _ = call(m, "execute_command", {"command": "echo out; echo oops >&2; exit 3"}, label="execute_command (exit 3)")
    call(m, "read_task_output", {"task_id": oops["task_id"], "stream": "stderr"}, label="read_task_output (stderr)")
    call(m, "check_task_status", {"task_id": oops["task_id"]}, label="check_task_status (failed)")
    # Network: the operator allows pypi.org and lets callers add names under .example.org.
    allowed, _ = call(m, "execute_command", {
        "command": "echo \"$HTTPS_PROXY\"; curl -sS -o /dev/null -w '%{http_code}\\n' http://example.com/",
        "network": "allow", "network_allow": ["docs.example.org"], "session_id": "net"},
        label="execute_command (network allow)")
    call(m, "execute_command", {"command": "true", "session_id": "net", "network": "none"},
         label="execute_command (network widened)")
    call(m, "execute_command", {"command": "true", "network": "allow", "network_allow": ["pypi.io"]},
         label="execute_command (network_allow refused)")
    call(m, "get_sessions", {"session_id": "net"}, label="get_sessions (network)")
    call(m, "execute_command", {"command": "sleep 5", "timeout": 1}, label="execute_command (timeout)")
    call(m, "execute_command", {"command": "echo '::progress:: 50 half'; sleep 1; echo ok"},
         label="execute_command (progress token)", meta={"progressToken": 7})
    going, _ = call(m, "execute_command", {"command": "echo started; sleep 3; echo finished", "wait_seconds": 1},
                    label="execute_command (still going)")
    call(m, "wait_for_tasks", {"task_ids": [going["task_id"], build], "mode": "all", "timeout": 30},
         label="wait_for_tasks (all)", meta={"progressToken": 8})
    slow, _ = call(m, "execute_command", {"command": "sleep 30", "wait_seconds": 0}, label="execute_command (wait 0)")
    call(m, "wait_for_tasks", {"task_ids": [slow["task_id"], going["task_id"]], "timeout": 5},
         label="wait_for_tasks (any)")
    call(m, "wait_for_tasks", {"task_ids": [slow["task_id"]], "timeout": 1}, label="wait_for_tasks (runs out)")
    call(m, "cancel_task", {"task_id": slow["task_id"]}, label="cancel_task (the slow one)")
    call(m, "read_task_output", {"task_id": going["task_id"], "tail": 9}, label="read_task_output (tail)")
    # --- files -------------------------------------------------------------------------------
    call(m, "write_file", {"session_id": "notes", "path": "docs/plan.md", "content": "# Plan\n1. build\n2. test\n"})
    call(m, "execute_command", {"command": "wc -l docs/plan.md && printf '\\211PNG\\r\\n' > logo.png && ln -s /etc/shadow shadow",
                                "session_id": "notes"}, label="execute_command (files)")
    call(m, "read_file", {"session_id": "notes", "path": "docs/plan.md", "offset": 7, "length": 9})
    call(m, "read_file", {"session_id": "notes", "path": "logo.png", "encoding": "base64"}, label="read_file (base64)")
    call(m, "write_file", {"session_id": "notes", "path": "docs/plan.md", "content": "3. ship\n", "append": True},
         label="write_file (append)")
    call(m, "list_files", {"session_id": "notes", "depth": 2})
    call(m, "read_file", {"session_id": "notes", "path": "shadow"}, label="error read_file (link out)")
    call(m, "read_file", {"session_id": "notes", "path": "logo.png"}, label="error read_file (not text)")
    call(m, "get_sessions", {})
    call(m, "get_sessions", {"session_id": session}, label="get_sessions (one)")
    call(m, "get_sessions", {"session_id": build_session}, label="get_sessions (session of a submit_task task)")
    call(m, "get_volume_mappings", {})
    call(m, "stop_session", {"session_id": session})

    # --- supervision -----------------------------------------------------------------------------
    call(m, "health_check", {})
    call(m, "get_background_task_status", {})
    call(m, "pause_background_tasks", {})
    call(m, "resume_background_tasks", {})
    call(m, "restart_background_tasks", {})

    # --- errors ----------------------------------------------------------------------------------
    call(m, "check_task_status", {"task_id": "0190f1e2-0000-7000-8000-000000000000"}, label="error TASK_NOT_FOUND")
    call(m, "submit_task", {"task_type": "shell", "params": {"command": "true"}}, label="error INVALID_TASK_TYPE")
    call(m, "list_tasks", {"status": "sleeping"}, label="error INVALID_ARGUMENT")
    call(m, "submit_task", {"task_type": "command", "params": "echo hi"}, label="error INVALID_ARGUMENT (params)")
    call(m, "list_tasks", {"limit": "ten"}, label="error INVALID_ARGUMENT (schema)")
    call(m, "check_task_status", {"taskId": build}, label="error INVALID_ARGUMENT (unknown argument)")
    call(m, mb, {"action": "explode"}, label="error UNKNOWN_ACTION")
    call(m, mb, {"action": "pause"}, label="error MISSING_TASK_ID")
    call(m, mb, {"action": "retry", "task_id": build}, label="error ILLEGAL_TRANSITION")
    call(m, mb, {"action": "pause", "task_id": build}, label="error ILLEGAL_TRANSITION (pause)")
    call(m, "stop_session", {"session_id": "nosuchsession"}, label="error SESSION_NOT_FOUND")
    call(m, "read_task_output", {"task_id": build, "max_bytes": 0}, label="error INVALID_ARGUMENT (max_bytes)")
    m.close()
    return build


def interrupted_task(binary, env, log):
    """A task that a graceful stop of msbd interrupted, as the next msbd first sees it."""
    m = Msbd(binary, env, {}, log)
    task, _ = call(m, "submit_task", {"task_type": "command", "params": {"command": "sleep 30"}},
                   label="submit_task (to be interrupted)")
    task_id = task["task_id"]
    wait_status(m, task_id, {"running"})
    m.close()  # stdin closed: msbd stops gracefully within MSB_SHUTDOWN_TIMEOUT (2 s here)
    m = Msbd(binary, env, {}, log)
    call(m, "check_task_status", {"task_id": task_id}, label="check_task_status (interrupted)")
    call(m, "manage_background_tasks", {"action": "cancel", "task_id": task_id},
         label="manage_background_tasks cancel (the interrupted task)")
    m.close()


def second_connection(binary, env, log, old_task):
    caps = {"extensions": {TASKS_EXTENSION: {}}}
    m = Msbd(binary, env, caps, log)
    record("rpc", "initialize (tasks extension)", {"capabilities": caps}, {"result": m.init[0]["result"]}, [])
    response, notes = m.request("tools/call", {"name": "execute_command", "arguments": {"command": "sleep 1; echo from a task"}})
    record("tool", "execute_command (tasks extension)", {"command": "sleep 1; echo from a task"}, response, notes)
    task_id = response["result"]["taskId"]
    rpc(m, "tasks/get", {"taskId": task_id}, label="tasks/get (working)")
    time.sleep(3)
    rpc(m, "tasks/get", {"taskId": task_id}, label="tasks/get (completed)")
    rpc(m, "tasks/get", {"taskId": old_task}, label="tasks/get (a task from before the restart)")
    response, _ = m.request("tools/call", {"name": "execute_command", "arguments": {"command": "sleep 600"}})
    long_id = response["result"]["taskId"]
    time.sleep(1)
    rpc(m, "tasks/cancel", {"taskId": long_id})
    time.sleep(1)
    rpc(m, "tasks/get", {"taskId": long_id}, label="tasks/get (cancelled)")
    rpc(m, "tasks/get", {"taskId": "nope"}, label="tasks/get (unknown)")
    call(m, "execute_code", {"code": "print(1)", "timeout": 900}, label="execute_code (tasks extension, bad timeout)")
    m.close()


def http_post(url, message, session=None):
    """One JSON-RPC message to msbd's streamable HTTP endpoint; returns (answer, session id)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if session:
        headers["Mcp-Session-Id"] = session
    request = urllib.request.Request(url, json.dumps(message).encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read().decode()
        session = response.headers.get("Mcp-Session-Id") or session
    for line in body.splitlines():
        if line.startswith("data:") and line[5:].strip():
            return json.loads(line[5:]), session
    return (json.loads(body) if body.strip() else None), session


def http_connection(binary, env, log):
    """`msbd serve --transport http`: which tools an HTTP client is offered by default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "serve", "--transport", "http", "--listen", f"127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        for _ in range(50):
            try:
                init, session = http_post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "capture-examples", "version": "0.0.0"}}})
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    raise SystemExit("msbd's HTTP transport exited") from None
                time.sleep(0.2)
        else:
            raise SystemExit("msbd's HTTP transport never answered")
        http_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        tools, _ = http_post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}, session)
        names = sorted(t["name"] for t in tools["result"]["tools"])
        record("rpc", "tools/list over HTTP (names only)", {}, {"tool_names": names, "count": len(names)}, [])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(binary, out):
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o755)
        with open(os.path.join(shared, "input.csv"), "w") as f:
            f.write("a,b\n1,2\n")
        env = dict(os.environ)
        env["MSB_DATA_DIR"] = data_dir
        env["MSB_LOG_LEVEL"] = "warn"
        env["MSB_SHUTDOWN_TIMEOUT"] = "2"
        env["MSB_SHARED_VOLUME_PATH"] = f"{shared}:/shared:ro"
        env["MSB_NETWORK_ALLOW"] = "pypi.org,files.pythonhosted.org"
        env["MSB_NETWORK_CALLER_ALLOW"] = ".example.org"
        with open(os.path.join(data_dir, "..", f"msbd-capture-{os.getpid()}.log"), "w") as log:
            build = first_connection(binary, env, log)
            second_connection(binary, env, log, build)
            interrupted_task(binary, env, log)
            try:
                http_connection(binary, env, log)
            except SystemExit as error:
                print(f"warning: skipped the HTTP capture: {error}", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(RECORDS, f, indent=2)
    print(f"wrote {len(RECORDS)} records to {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python3 interop/capture_examples.py PATH/TO/msbd [OUT.json]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "examples.json")
