// Interoperability check: the official TypeScript MCP SDK (@modelcontextprotocol/sdk) drives msbd.
//
// Usage: node interop/typescript/client.mjs PATH/TO/msbd
// (after `npm ci --prefix interop/typescript`, as .ci/run does; `cargo xtask ci` runs it)
//
// Over stdio it starts `msbd serve` on a fresh data directory, lists the tools, runs a command
// task to its result through the background-task tools (submit, status polled until completed,
// output from cursor 0, result) and runs code with `execute_code`. The SDK validates every
// structured answer against the tool's output schema (it compiles a validator per tool with Ajv at
// tools/list; this script checks each tool got one). Then, over streamable HTTP, it starts
// `msbd serve --transport http` on a free loopback port (with MSB_SUPERVISION_TOOLS=true, as
// HTTP does not list health_check by default), lists the tools, calls health_check, ends the
// session and stops msbd with SIGTERM.
//
// It fails (exit 1) on the first wrong answer, and also when anything at all is written through
// the console while it runs: this script writes only to process.stdout, so console output comes
// from the SDK or its libraries, such as Ajv's `unknown format "uint64" ignored in schema at path
// ...` for a schema with a non-standard format. Process warnings that mention a schema or an
// unknown format fail it too.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { AjvJsonSchemaValidator } from '@modelcontextprotocol/sdk/validation/ajv';

const EXPECTED_TOOLS = [
    'create_background_task', 'submit_task', 'check_task_status', 'get_task_result',
    'wait_for_tasks', 'cancel_task', 'list_tasks', 'read_task_output', 'manage_background_tasks',
    'manage_task_queue', 'execute_code', 'execute_command', 'get_sessions', 'stop_session',
    'get_volume_mappings', 'health_check', 'get_background_task_status',
    'restart_background_tasks', 'pause_background_tasks', 'resume_background_tasks',
];

// --- console capture -------------------------------------------------------------------------

const captured = [];
const say = (line) => process.stdout.write(`${line}\n`);
for (const level of ['log', 'info', 'warn', 'error', 'debug', 'trace']) {
    const original = console[level].bind(console);
    console[level] = (...args) => {
        const text = args.map((a) => (typeof a === 'string' ? a : a instanceof Error ? a.stack : JSON.stringify(a))).join(' ');
        captured.push(`console.${level}: ${text}`);
        original(...args);
    };
}
process.on('warning', (warning) => {
    const text = `${warning.name}: ${warning.message}`;
    if (/unknown format|schema/i.test(text)) {
        captured.push(`process warning: ${text}`);
    } else {
        process.stderr.write(`(process warning, not counted) ${text}\n`);
    }
});

let checks = 0;
class CheckFailed extends Error {}
function check(condition, message) {
    if (!condition) {
        throw new CheckFailed(message);
    }
    checks += 1;
}

function noConsoleOutput(when) {
    // The lines themselves went through to the console as well, above this failure.
    check(captured.length === 0, `${when}: ${captured.length} console line(s), the first: ${captured[0]}`);
}

async function call(client, tool, args) {
    // callTool validates structuredContent against the tool's output schema (cached at listTools).
    const result = await client.callTool({ name: tool, arguments: args });
    check(!result.isError, `${tool}(${JSON.stringify(args)}) failed: ${JSON.stringify(result.content)}`);
    check(result.structuredContent !== undefined && result.structuredContent !== null, `${tool} gave no structured content`);
    check(result.content?.[0]?.type === 'text' && result.content[0].text, `${tool} gave no text content`);
    return result.structuredContent;
}

async function listAndCheckTools(client) {
    const { tools } = await client.listTools();
    const names = new Set(tools.map((tool) => tool.name));
    const missing = EXPECTED_TOOLS.filter((name) => !names.has(name));
    check(missing.length === 0, `missing tools: ${missing.join(', ')}`);
    // The output schemas are compiled right here, so validator warnings appear now.
    noConsoleOutput('compiling the tools\' output schemas');
    // msbd publishes an output schema for every tool, so every structured answer is validated.
    for (const tool of tools) {
        check(tool.outputSchema !== undefined, `${tool.name} has no output schema`);
        check(client.getToolOutputValidator(tool.name) !== undefined, `the SDK compiled no output validator for ${tool.name}`);
    }
    return tools;
}

function newClient() {
    // The SDK's default validator, named so that output validation is certainly on.
    return new Client(
        { name: 'msbd-interop-typescript', version: '0.0.0' },
        { jsonSchemaValidator: new AjvJsonSchemaValidator() },
    );
}

function serverEnv(dataDir) {
    const env = { ...process.env, MSB_DATA_DIR: dataDir };
    env.MSB_LOG_LEVEL ??= 'warn';
    return env;
}

// --- stdio -----------------------------------------------------------------------------------

async function overStdio(msbd) {
    const dataDir = mkdtempSync(join(tmpdir(), 'msbd-interop-ts-'));
    const client = newClient();
    const transport = new StdioClientTransport({ command: msbd, args: ['serve'], env: serverEnv(dataDir), stderr: 'inherit' });
    try {
        await client.connect(transport);
        const server = client.getServerVersion();
        say(`stdio: connected to ${server?.name} ${server?.version}`);
        const tools = await listAndCheckTools(client);
        const withSchema = tools.filter((tool) => tool.outputSchema).length;
        say(`stdio: ${tools.length} tools listed, ${withSchema} output schemas compiled without a word from the validator`);

        const created = await call(client, 'submit_task', {
            task_type: 'command',
            params: { command: "echo hello; echo '::progress:: 50 half'" },
        });
        const taskId = created.task_id;
        check(typeof taskId === 'string' && taskId.length > 0, `submit_task gave no task_id: ${JSON.stringify(created)}`);

        let status;
        const deadline = Date.now() + 60_000;
        for (;;) {
            status = await call(client, 'check_task_status', { task_id: taskId });
            for (const key of ['task_id', 'status', 'progress', 'eta_seconds']) {
                check(key in status, `check_task_status lacks ${key}: ${JSON.stringify(status)}`);
            }
            if (status.status === 'completed') break;
            check(['pending', 'scheduled', 'running'].includes(status.status), `task ${taskId} is ${JSON.stringify(status)}`);
            check(Date.now() < deadline, `task ${taskId} not completed after 60 s: ${JSON.stringify(status)}`);
            await sleep(100);
        }

        const output = await call(client, 'read_task_output', { task_id: taskId, cursor: 0 });
        check(typeof output.data === 'string' && output.data.includes('hello'), `read_task_output: ${JSON.stringify(output)}`);
        check(Number.isInteger(output.next_cursor) && output.next_cursor > 0, `read_task_output next_cursor: ${JSON.stringify(output)}`);

        const result = await call(client, 'get_task_result', { task_id: taskId });
        check(result.status === 'completed', `get_task_result: ${JSON.stringify(result)}`);
        check(result.result?.exit_code === 0, `get_task_result exit code: ${JSON.stringify(result)}`);
        say(`stdio: task ${taskId} completed; output from cursor 0: ${JSON.stringify(output.data)}`);

        const code = await call(client, 'execute_code', { code: 'print(6*7)' });
        check(String(code.output_tail ?? '').includes('42'), `execute_code answered ${JSON.stringify(code)}`);
        say('stdio: execute_code printed 42');
        noConsoleOutput('over stdio');
    } finally {
        await client.close();
        rmSync(dataDir, { recursive: true, force: true });
    }
}

// --- streamable HTTP -------------------------------------------------------------------------

function freePort() {
    return new Promise((resolve, reject) => {
        const server = createServer();
        server.unref();
        server.on('error', reject);
        server.listen(0, '127.0.0.1', () => {
            const { port } = server.address();
            server.close(() => resolve(port));
        });
    });
}

async function waitReady(base, child) {
    const deadline = Date.now() + 30_000;
    for (;;) {
        check(child.exitCode === null && child.signalCode === null, `msbd serve --transport http exited early (${child.exitCode ?? child.signalCode})`);
        try {
            const response = await fetch(`${base}/readyz`);
            if (response.ok) return;
        } catch {
            // not listening yet
        }
        check(Date.now() < deadline, `msbd serve --transport http not ready at ${base}/readyz after 30 s`);
        await sleep(100);
    }
}

async function overHttp(msbd) {
    const dataDir = mkdtempSync(join(tmpdir(), 'msbd-interop-ts-http-'));
    const port = await freePort();
    const env = serverEnv(dataDir);
    delete env.MSB_AUTH_TOKEN; // loopback without a token
    env.MSB_SUPERVISION_TOOLS = 'true'; // off for HTTP by default; health_check is one of them
    const child = spawn(msbd, ['serve', '--transport', 'http', '--listen', `127.0.0.1:${port}`], {
        env,
        stdio: ['ignore', 'inherit', 'inherit'],
    });
    const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const base = `http://127.0.0.1:${port}`;
    const client = newClient();
    try {
        await waitReady(base, child);
        await client.connect(new StreamableHTTPClientTransport(new URL(`${base}/mcp`)));
        const server = client.getServerVersion();
        say(`http: connected to ${server?.name} ${server?.version} at ${base}/mcp`);
        const tools = await listAndCheckTools(client);
        const health = await call(client, 'health_check', {});
        check(typeof health === 'object', `health_check: ${JSON.stringify(health)}`);
        say(`http: ${tools.length} tools listed; health_check answered`);
        // Ends the session (DELETE /mcp) and closes the transport.
        await client.transport.terminateSession();
        await client.close();
        noConsoleOutput('over streamable HTTP');
    } finally {
        await client.close().catch(() => {});
        if (child.exitCode === null && child.signalCode === null) {
            child.kill('SIGTERM');
        }
        const { code, signal } = await Promise.race([
            exited,
            sleep(30_000).then(() => {
                child.kill('SIGKILL');
                return { code: null, signal: 'timeout' };
            }),
        ]);
        rmSync(dataDir, { recursive: true, force: true });
        if (signal === 'timeout') {
            throw new CheckFailed('msbd serve --transport http did not stop within 30 s of SIGTERM');
        }
        say(`http: msbd stopped on SIGTERM (exit ${code ?? signal})`);
    }
}

// --- main ------------------------------------------------------------------------------------

async function main() {
    const msbd = process.argv[2];
    if (!msbd || process.argv.length !== 3) {
        process.stderr.write('usage: node interop/typescript/client.mjs PATH/TO/msbd\n');
        process.exit(2);
    }
    try {
        await overStdio(msbd);
        await overHttp(msbd);
        noConsoleOutput('at the end');
    } catch (error) {
        const message = error instanceof CheckFailed ? error.message : error?.stack ?? String(error);
        process.stderr.write(`typescript interop: FAILED after ${checks} checks: ${message}\n`);
        process.exit(1);
    }
    say(`typescript interop: ok (${checks} checks)`);
    process.exit(0);
}

await main();
