//! The web console (`/ui`) over plain HTTP against the built binary: signing in, the headers
//! every page carries, the guards of every action (CSRF token, `Origin`, the operator's powers,
//! another principal's tasks), escaping, and the live event stream. The browser test
//! (`interop/console_browser.py`, run by `cargo xtask ci`) drives the same pages in Chromium.

use std::time::Duration;

use reqwest::header::{
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, ORIGIN, SET_COOKIE,
};
use reqwest::redirect::Policy;
use serde_json::json;

use crate::common::{Client, ok, wait_until};
use crate::e2e_http::Daemon;

const AGENT: &str = "console-agent-token-0123456789";
const OTHER: &str = "console-other-token-0123456789";
const OPERATOR: &str = "console-operator-token-0123456789";

const FORM: &str = "application/x-www-form-urlencoded";

/// A form's body.
fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Signs in with `token`; the session cookie (`name=value`).
async fn sign_in(daemon: &Daemon, token: &str) -> String {
    let response = browser()
        .post(daemon.url("/ui/login"))
        .header(ORIGIN, daemon.url(""))
        .header(CONTENT_TYPE, FORM)
        .body(form(&[("token", token)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303, "signing in");
    assert_eq!(response.headers()[LOCATION], "/ui/tasks");
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    cookie.split(';').next().unwrap().to_owned()
}

/// A page's HTML, as the holder of `cookie` sees it.
async fn page(daemon: &Daemon, cookie: &str, path: &str) -> (u16, String) {
    let response = browser()
        .get(daemon.url(path))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The CSRF token on a page.
fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[start..start + 32].to_owned()
}

/// Posts a console form; the status and where it sends the browser (decoded).
async fn post(daemon: &Daemon, cookie: &str, path: &str, csrf: &str) -> (u16, String) {
    let response = browser()
        .post(daemon.url(path))
        .header(COOKIE, cookie)
        .header(ORIGIN, daemon.url(""))
        .header(CONTENT_TYPE, FORM)
        .body(form(&[("csrf", csrf)]))
        .send()
        .await
        .unwrap();
    let location = response
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let location = url_decode(&location);
    (response.status().as_u16(), location)
}

fn url_decode(text: &str) -> String {
    url::form_urlencoded::parse(text.as_bytes())
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_and_guards_every_action() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("MSB_OPERATOR_TOKEN", OPERATOR)];
    let daemon = Daemon::start_with(dir.path(), AGENT, &env).await;

    // Nobody signed in: pages send to the login form; every answer carries the policy.
    let response = browser().get(daemon.url("/ui/tasks")).send().await.unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()[LOCATION], "/ui/login");
    let csp = response.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let response = browser().get(daemon.url("/ui/login")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert!(response.headers().contains_key(CONTENT_SECURITY_POLICY));
    let html = response.text().await.unwrap();
    assert!(
        html.contains("method=\"post\" action=\"/ui/login\""),
        "{html}"
    );
    assert!(!html.contains("<script>"), "no inline script: {html}");

    // A wrong token, and a login from another origin, are refused.
    let wrong = browser()
        .post(daemon.url("/ui/login"))
        .header(ORIGIN, daemon.url(""))
        .header(CONTENT_TYPE, FORM)
        .body(form(&[("token", "not-a-token-of-msbd")]))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(!wrong.headers().contains_key(SET_COOKIE));
    let elsewhere = browser()
        .post(daemon.url("/ui/login"))
        .header(ORIGIN, "http://evil.example")
        .header(CONTENT_TYPE, FORM)
        .body(form(&[("token", AGENT)]))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 403);

    // The agent's task, with a tag that would be markup if it were not escaped.
    let agent = daemon.connect(AGENT, Client::default()).await;
    let created = ok(
        &agent,
        "create_background_task",
        json!({
            "task_type": "command",
            "params": {"command": "sleep 30"},
            "tags": ["<script>alert(1)</script>"],
        }),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();

    // The agent signs in: its own task is there, escaped.
    let agent_cookie = sign_in(&daemon, AGENT).await;
    let (status, html) = page(&daemon, &agent_cookie, "/ui/tasks").await;
    assert_eq!(status, 200);
    assert!(html.contains(&id), "the agent's task is listed");
    let (status, html) = page(&daemon, &agent_cookie, &format!("/ui/tasks/{id}")).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(
        !html.contains("<script>alert(1)"),
        "a tag went out as markup"
    );
    let agent_csrf = csrf_of(&html);

    // Bearer works as well as the cookie; a token is never taken from a URL.
    let response = browser()
        .get(daemon.url("/ui/tasks"))
        .bearer_auth(AGENT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = browser()
        .get(daemon.url(&format!("/ui/tasks?token={AGENT}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303, "a token in the URL is not a login");

    // An action without the token, with another's, or from another origin does nothing.
    let pause = format!("/ui/tasks/{id}/pause");
    let (status, _) = post(&daemon, &agent_cookie, &pause, "").await;
    assert_eq!(status, 403);
    let (status, _) = post(&daemon, &agent_cookie, &pause, &"0".repeat(32)).await;
    assert_eq!(status, 403);
    let foreign = browser()
        .post(daemon.url(&pause))
        .header(COOKIE, &agent_cookie)
        .header(ORIGIN, "http://evil.example")
        .header(CONTENT_TYPE, FORM)
        .body(form(&[("csrf", agent_csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let task = ok(&agent, "check_task_status", json!({"task_id": id})).await;
    assert_ne!(task["status"], "paused", "a refused action paused the task");

    // The agent is not the operator: no pausing the queue or the loops.
    let (status, location) = post(&daemon, &agent_cookie, "/ui/queue/pause", &agent_csrf).await;
    assert_eq!(status, 303);
    assert!(location.contains("FORBIDDEN"), "{location}");
    let (status, location) = post(
        &daemon,
        &agent_cookie,
        "/ui/supervision/retention_pruner/pause",
        &agent_csrf,
    )
    .await;
    assert_eq!(status, 303);
    assert!(location.contains("FORBIDDEN"), "{location}");
    let stats = ok(&agent, "manage_task_queue", json!({"action": "get_stats"})).await;
    assert_eq!(stats["queue_statistics"]["queue_paused"], false, "{stats}");

    // Its own task it may act on, with its token.
    let (status, location) = post(&daemon, &agent_cookie, &pause, &agent_csrf).await;
    assert_eq!(
        (status, location.contains("error=")),
        (303, false),
        "{location}"
    );
    wait_until(Duration::from_secs(10), async || {
        let task = ok(&agent, "check_task_status", json!({"task_id": id})).await;
        match task["status"].as_str() {
            Some("paused") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    drop(agent);
    daemon.stop().await;

    // Another principal (msbd restarted with another agent token): the task is not found.
    let daemon = Daemon::start_with(dir.path(), OTHER, &env).await;
    let other_cookie = sign_in(&daemon, OTHER).await;
    let (status, html) = page(&daemon, &other_cookie, &format!("/ui/tasks/{id}")).await;
    assert_eq!(status, 404, "{html}");
    assert!(!html.contains("sleep 30"));
    let (_, html) = page(&daemon, &other_cookie, "/ui/tasks").await;
    assert!(!html.contains(&id), "another principal's task is listed");
    let other_csrf = csrf_of(&html);
    let (status, location) = post(
        &daemon,
        &other_cookie,
        &format!("/ui/tasks/{id}/cancel"),
        &other_csrf,
    )
    .await;
    assert_eq!(status, 303);
    assert!(location.contains("TASK_NOT_FOUND"), "{location}");

    // The operator sees every task, with its owner, and may cancel it.
    let operator_cookie = sign_in(&daemon, OPERATOR).await;
    let (status, html) = page(&daemon, &operator_cookie, &format!("/ui/tasks/{id}")).await;
    assert_eq!(status, 200);
    assert!(
        html.contains("token:"),
        "the owner is shown to the operator"
    );
    let operator_csrf = csrf_of(&html);
    assert_ne!(operator_csrf, other_csrf, "two logins share a CSRF token");
    let (status, location) = post(
        &daemon,
        &other_cookie,
        &format!("/ui/tasks/{id}/cancel"),
        &operator_csrf,
    )
    .await;
    assert_eq!(
        status, 403,
        "another login's CSRF token was taken: {location}"
    );
    let (status, location) = post(
        &daemon,
        &operator_cookie,
        &format!("/ui/tasks/{id}/cancel"),
        &operator_csrf,
    )
    .await;
    assert_eq!(
        (status, location.contains("error=")),
        (303, false),
        "{location}"
    );
    wait_until(Duration::from_secs(10), async || {
        let (_, html) = page(&daemon, &operator_cookie, &format!("/ui/tasks/{id}")).await;
        if html.contains("status s-cancelled") {
            Ok(())
        } else {
            Err("the task is not cancelled")
        }
    })
    .await;

    // Signing out ends the login.
    let (status, _) = post(&daemon, &operator_cookie, "/ui/logout", &operator_csrf).await;
    assert_eq!(status, 303);
    let (status, _) = page(&daemon, &operator_cookie, "/ui/tasks").await;
    assert_eq!(status, 303);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_streams_each_change_of_a_task_as_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("MSB_OPERATOR_TOKEN", OPERATOR)];
    let daemon = Daemon::start_with(dir.path(), AGENT, &env).await;
    let mut events = browser()
        .get(daemon.url("/ui/events"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let agent = daemon.connect(AGENT, Client::default()).await;
    let created = ok(
        &agent,
        "create_background_task",
        json!({
            "task_type": "command",
            "parameters": {"command": "echo '::progress:: 50 halfway'; sleep 0.5; echo done"},
        }),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    let mut statuses = Vec::new();
    let read = async {
        while let Some(chunk) = events.chunk().await.unwrap() {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = seen.find("\n\n") {
                let event: String = seen.drain(..end + 2).collect();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                let task: serde_json::Value = serde_json::from_str(data).unwrap();
                if task["task_id"] == id.as_str() {
                    let status = task["status"].as_str().unwrap().to_owned();
                    let step = (status, task["progress_message"].clone());
                    if statuses.last() != Some(&step) {
                        statuses.push(step);
                    }
                    if task["status"] == "completed" {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the task's completion never reached the stream");
    assert!(
        statuses
            .iter()
            .any(|(s, m)| s == "running" && m == "halfway"),
        "its progress was not streamed: {statuses:?}"
    );
    assert_eq!(statuses.last().unwrap().0, "completed", "{statuses:?}");
    drop(agent);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_daemon_serves_the_console_on_its_own_address() {
    use rmcp::ServiceExt as _;
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    // `msbd console --listen ADDR`: `msbd serve` with the console on ADDR (MSB_CONSOLE_ADDR).
    let mut command = tokio::process::Command::new(crate::common::MSBD);
    command
        .args(["console", "--listen", &format!("127.0.0.1:{port}")])
        .env("MSB_DATA_DIR", dir.path())
        .env("MSB_LOG_LEVEL", "warn")
        .stderr(std::process::Stdio::inherit());
    let transport = rmcp::transport::TokioChildProcess::new(command).unwrap();
    let client = Client::default().serve(transport).await.unwrap();
    let created = ok(
        &client,
        "create_background_task",
        json!({"task_type": "command", "params": {"command": "echo hi"}}),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    let base = format!("http://127.0.0.1:{port}");
    // No token anywhere: the console is loopback's, and its user the operator.
    let html = wait_until(Duration::from_secs(10), async || {
        let response = browser()
            .get(format!("{base}/ui/tasks"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let html = response.text().await.map_err(|e| e.to_string())?;
        if html.contains(&id) {
            Ok(html)
        } else {
            Err(format!("the stdio client's task is not listed: {html}"))
        }
    })
    .await;
    assert!(html.contains(">operator<"), "{html}");
    let mcp = browser().post(format!("{base}/mcp")).send().await.unwrap();
    assert_eq!(mcp.status(), 404, "MCP is served on stdio only");
    let health = browser()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The client goes: msbd stops, the console with it.
    client.cancel().await.unwrap();
    wait_until(Duration::from_secs(20), async || {
        match browser().get(format!("{base}/healthz")).send().await {
            Err(_) => Ok(()),
            Ok(response) => Err(format!("still serving: {}", response.status())),
        }
    })
    .await;
}

/// Posts a console form with fields besides the CSRF token; where it sends the browser
/// (decoded).
async fn post_form(daemon: &Daemon, cookie: &str, path: &str, fields: &[(&str, &str)]) -> String {
    let response = browser()
        .post(daemon.url(path))
        .header(COOKIE, cookie)
        .header(ORIGIN, daemon.url(""))
        .header(CONTENT_TYPE, FORM)
        .body(form(fields))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303, "posting to {path}");
    url_decode(
        response
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap())
            .unwrap_or_default(),
    )
}

/// The text of the first cell of `class` in the row that carries `marker`.
fn cell<'a>(html: &'a str, marker: &str, class: &str) -> &'a str {
    let row = &html[html
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in {html}"))..];
    let row = &row[..row.find("</tr>").unwrap()];
    let open = format!("class=\"num {class}\">");
    let start = row
        .find(&open)
        .unwrap_or_else(|| panic!("no {class} in {row}"))
        + open.len();
    &row[start..start + row[start..].find('<').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sets_limits_and_sees_what_sessions_use_and_each_task_history() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("MSB_OPERATOR_TOKEN", OPERATOR)];
    let daemon = Daemon::start_with(dir.path(), AGENT, &env).await;
    let agent = daemon.connect(AGENT, Client::default()).await;
    let operator = sign_in(&daemon, OPERATOR).await;
    let (_, html) = page(&daemon, &operator, "/ui/queue").await;
    let csrf = csrf_of(&html);
    assert!(html.contains("id=\"limit-all\""), "{html}");

    // Concurrency limits: the whole queue's, then one type's, then that one removed.
    let location = post_form(
        &daemon,
        &operator,
        "/ui/queue/limits",
        &[("csrf", &csrf), ("max_concurrent", "7")],
    )
    .await;
    assert!(!location.contains("error="), "{location}");
    let stats = ok(&agent, "manage_task_queue", json!({"action": "get_stats"})).await;
    assert_eq!(stats["queue_statistics"]["max_concurrent"], 7, "{stats}");
    let location = post_form(
        &daemon,
        &operator,
        "/ui/queue/limits",
        &[
            ("csrf", &csrf),
            ("task_type", "command"),
            ("max_concurrent", "2"),
        ],
    )
    .await;
    assert!(!location.contains("error="), "{location}");
    let stats = ok(&agent, "manage_task_queue", json!({"action": "get_stats"})).await;
    assert_eq!(
        stats["queue_statistics"]["type_limits"],
        json!({"command": 2}),
        "{stats}"
    );
    let (_, html) = page(&daemon, &operator, "/ui/queue").await;
    assert_eq!(cell(&html, "data-type=\"command\"", "limit"), "2");
    assert!(
        html.contains("data-type=\"code\""),
        "types without tasks are listed: {html}"
    );
    post_form(
        &daemon,
        &operator,
        "/ui/queue/limits",
        &[
            ("csrf", &csrf),
            ("task_type", "command"),
            ("max_concurrent", "0"),
        ],
    )
    .await;
    let stats = ok(&agent, "manage_task_queue", json!({"action": "get_stats"})).await;
    assert_eq!(
        stats["queue_statistics"]["type_limits"],
        json!({}),
        "{stats}"
    );
    // Nonsense, and another principal, are refused with what to do.
    for (value, code) in [("many", "INVALID_ARGUMENT"), ("0", "INVALID_ARGUMENT")] {
        let location = post_form(
            &daemon,
            &operator,
            "/ui/queue/limits",
            &[("csrf", &csrf), ("max_concurrent", value)],
        )
        .await;
        assert!(location.contains(code), "{value}: {location}");
    }
    let agent_cookie = sign_in(&daemon, AGENT).await;
    let (_, agent_html) = page(&daemon, &agent_cookie, "/ui/queue").await;
    assert!(
        !agent_html.contains("id=\"limit-all\""),
        "the agent gets the form"
    );
    let location = post_form(
        &daemon,
        &agent_cookie,
        "/ui/queue/limits",
        &[("csrf", &csrf_of(&agent_html)), ("max_concurrent", "1")],
    )
    .await;
    assert!(location.contains("FORBIDDEN"), "{location}");
    let stats = ok(&agent, "manage_task_queue", json!({"action": "get_stats"})).await;
    assert_eq!(stats["queue_statistics"]["max_concurrent"], 7, "{stats}");

    // A session with three processes running: what it uses, and under which isolation.
    let created = ok(
        &agent,
        "create_background_task",
        json!({
            "task_type": "command",
            "params": {"command": "sleep 30 & sleep 30 & wait"},
        }),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    let session = wait_until(Duration::from_secs(15), async || {
        let task = ok(&agent, "check_task_status", json!({"task_id": id})).await;
        match (task["status"].as_str(), task["session_id"].as_str()) {
            (Some("running"), Some(session)) => Ok(session.to_owned()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (_, html) = page(&daemon, &operator, "/ui/sessions").await;
    let open = "id=\"isolation\">";
    let start = html.find(open).expect("the isolation layers") + open.len();
    let isolation = html[start..start + html[start..].find('<').unwrap()].to_owned();
    let html = wait_until(Duration::from_secs(10), async || {
        let (_, html) = page(&daemon, &operator, "/ui/sessions").await;
        let marker = format!("data-session-id=\"{session}\"");
        if !html.contains(&marker) {
            return Err("the session is not listed".to_owned());
        }
        // The shell and its two sleeps at least (bubblewrap adds its own), where the host
        // counts them (cgroups).
        let processes: u32 = cell(&html, &marker, "processes").parse().unwrap_or(0);
        if isolation.contains("cgroup") && processes < 3 {
            return Err(format!("processes {}", cell(&html, &marker, "processes")));
        }
        Ok(html)
    })
    .await;
    let marker = format!("data-session-id=\"{session}\"");
    println!(
        "isolation {isolation:?}: memory {}, cpu {}, processes {}",
        cell(&html, &marker, "memory"),
        cell(&html, &marker, "cpu"),
        cell(&html, &marker, "processes")
    );
    assert!(html.contains("id=\"isolation\""), "{html}");
    if isolation.contains("cgroup") {
        assert!(cell(&html, &marker, "memory").ends_with("iB"), "{html}");
        assert!(cell(&html, &marker, "cpu").ends_with(" s"), "{html}");
    } else {
        println!("no cgroups on this host: the session's use is not measured, and shown as —");
        assert_eq!(cell(&html, &marker, "processes"), "—");
    }

    // A task's history: its submission, each attempt's start and end, and its end.
    let created = ok(
        &agent,
        "create_background_task",
        json!({
            "task_type": "command",
            "params": {"command": "exit 3"},
            "max_retries": 1,
        }),
    )
    .await;
    let failing = created["task_id"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(20), async || {
        let task = ok(&agent, "check_task_status", json!({"task_id": failing})).await;
        match task["status"].as_str() {
            Some("failed") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (_, html) = page(&daemon, &operator, &format!("/ui/tasks/{failing}")).await;
    let history = &html[html.find("id=\"history\"").expect("a history")..];
    let history = &history[..history.find("</table>").unwrap()];
    let order = [
        "submitted",
        "attempt 1 started",
        "attempt 1 ended: failed",
        "attempt 2 started",
        "attempt 2 ended: failed",
        "ended failed",
    ];
    let mut at = 0;
    for event in order {
        let found = history[at..]
            .find(event)
            .unwrap_or_else(|| panic!("{event:?} missing or out of order in {history}"));
        at += found + event.len();
    }
    assert!(html.contains("<th>Node</th>"), "{html}");
    // The failed run's result: its exit code, as get_task_result gives it.
    let result = &html[html.find("id=\"result\">").expect("a result")..];
    assert!(
        result[..result.find("</pre>").unwrap()].contains("&quot;exit_code&quot;: 3"),
        "{result}"
    );
    assert!(
        html.contains("this msbd"),
        "a SQLite store's attempts ran here: {html}"
    );
    drop(agent);
    daemon.stop().await;
}
