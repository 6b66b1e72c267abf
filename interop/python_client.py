"""Interoperability check: the official Python MCP SDK (`pip install mcp`) drives msbd over stdio.

Usage: python interop/python_client.py PATH/TO/msbd

It starts `msbd serve` on a fresh data directory, lists the tools, runs a command task to its
result through the background-task tools (submit, status, output by cursor, result), runs code
with `execute_code`, has a long `execute_command` answer within the default call wait (20 s, well
before the ~60 s after which clients give up) with its task id, and checks every structured answer against the tool's output schema (the
SDK does that itself for successful calls). Exits non-zero on the first failure. `cargo xtask ci`
runs it.
"""

import asyncio
import base64
import os
import sys
import tempfile
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

EXPECTED_TOOLS = {
    "create_background_task", "submit_task", "check_task_status", "get_task_result",
    "wait_for_tasks", "cancel_task", "list_tasks", "read_task_output", "manage_background_tasks",
    "manage_task_queue", "execute_code", "execute_command", "get_sessions", "stop_session",
    "get_volume_mappings", "write_file", "read_file", "list_files", "health_check", "get_background_task_status",
    "restart_background_tasks", "pause_background_tasks", "resume_background_tasks",
}


def check(condition, message):
    if not condition:
        raise SystemExit(f"interop FAILED: {message}")


async def call(session, tool, arguments):
    result = await session.call_tool(tool, arguments)
    check(not result.is_error, f"{tool}({arguments}) failed: {result.content}")
    check(result.structured_content is not None, f"{tool} gave no structured content")
    text = result.content[0].text if result.content else ""
    check(text, f"{tool} gave no text content")
    return result.structured_content


async def main(msbd):
    with tempfile.TemporaryDirectory() as data_dir:
        env = dict(os.environ)
        env["MSB_DATA_DIR"] = data_dir
        env.setdefault("MSB_LOG_LEVEL", "warn")
        params = StdioServerParameters(command=msbd, args=["serve"], env=env)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                print(f"connected to {init.server_info.name} {init.server_info.version}")
                tools = await session.list_tools()
                names = {tool.name for tool in tools.tools}
                check(EXPECTED_TOOLS <= names, f"missing tools: {sorted(EXPECTED_TOOLS - names)}")
                print(f"{len(names)} tools listed")

                created = await call(session, "submit_task", {
                    "task_type": "command",
                    "params": {"command": "echo hello-from-python; echo '::progress:: 50 half'; sleep 0.3; echo bye"},
                    "priority": "high",
                })
                task_id = created["task_id"]
                status = await call(session, "check_task_status", {"task_id": task_id})
                for key in ("task_id", "status", "progress", "eta_seconds"):
                    check(key in status, f"check_task_status lacks {key}: {status}")
                result = await call(session, "get_task_result", {"task_id": task_id, "wait": True, "timeout": 60})
                check(result["status"] == "completed", f"task ended {result}")
                check(result["result"]["exit_code"] == 0, f"exit code {result}")
                output, cursor = "", 0
                while True:
                    chunk = await call(session, "read_task_output", {"task_id": task_id, "cursor": cursor, "max_bytes": 8})
                    output += chunk["data"]
                    cursor = chunk["next_cursor"]
                    if chunk["complete"]:
                        break
                check("hello-from-python" in output and "bye" in output, f"output {output!r}")
                print(f"task {task_id} completed; output read by cursor: {output!r}")

                code = await call(session, "execute_code", {"code": "print(6 * 7)", "template": "python"})
                check("42" in code.get("output_tail", ""), f"execute_code answered {code}")
                listed = await call(session, "list_tasks", {"status": "completed"})
                check(listed["count"] == 2, f"list_tasks {listed}")
                print("execute_code and list_tasks ok")

                # Files in and out of a session: what write_file wrote a command reads; what a
                # command wrote (binary) read_file returns byte for byte.
                await call(session, "write_file", {"session_id": "py-files", "path": "in/data.txt", "content": "from python\n"})
                cat = await call(session, "execute_command", {
                    "command": "cat in/data.txt; python3 -c \"import sys; sys.stdout.buffer.write(bytes(range(256)))\" > out.bin",
                    "session_id": "py-files",
                })
                check(cat["output_tail"] == "from python\n", f"the command read {cat}")
                got = await call(session, "read_file", {"session_id": "py-files", "path": "out.bin", "encoding": "base64"})
                check(base64.b64decode(got["content"]) == bytes(range(256)), f"read_file gave {got}")
                listed = await call(session, "list_files", {"session_id": "py-files", "depth": 2})
                check({e["path"] for e in listed["entries"]} >= {"in", "in/data.txt", "out.bin"}, f"list_files {listed}")
                print("write_file, a command, read_file (binary) and list_files ok")

                # A long command answers on the server's default call wait (20 s), before the
                # ~60 s after which agent clients give up, with its task id; the task goes on.
                started = time.monotonic()
                going = await call(session, "execute_command", {"command": "echo begun; sleep 40"})
                elapsed = time.monotonic() - started
                check(elapsed < 30, f"a long execute_command answered after {elapsed:.1f} s")
                check(going["status"] in ("pending", "running"), f"execute_command answered {going}")
                check(going.get("output_tail") == "begun\n", f"no output so far in {going}")
                check("wait_for_tasks" in going.get("next", ""), f"no way to follow in {going}")
                waited = await call(session, "wait_for_tasks", {"task_ids": [going["task_id"]], "timeout": 0.5})
                check(waited["done"] is False and waited["tasks"][0]["status"] == "running", f"wait_for_tasks {waited}")
                tail = await call(session, "read_task_output", {"task_id": going["task_id"], "tail": 6})
                check(tail["data"] == "begun\n", f"read_task_output tail {tail}")
                await call(session, "cancel_task", {"task_id": going["task_id"]})
                print(f"a 40 s execute_command answered after {elapsed:.1f} s, still running, with its task id")
    print("interop ok: the official Python MCP SDK lists msbd's tools and runs a task to its result over stdio")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python interop/python_client.py PATH/TO/msbd")
    asyncio.run(main(sys.argv[1]))
