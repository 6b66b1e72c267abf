//! The console's pages, rendered on the server as HTML. Every value from a task, a session or a
//! request is escaped ([`esc`]); the pages hold no inline script or style (the
//! Content-Security-Policy forbids them): `assets/console.js` finds what it updates by ids and
//! `data-` attributes.

use std::fmt::Write as _;

use axum::http::StatusCode;
use axum::response::Html;
use mcp_tools::console::ConsoleError;
use serde_json::Value;

use super::{Flash, TasksQuery, Viewer, encode};

/// HTML-escapes `text`.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value's text (strings without quotes), escaped.
fn val(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => esc(text),
        other => esc(&other.to_string()),
    }
}

/// The pages of the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Tasks,
    Queue,
    Sessions,
    Supervision,
}

/// The page around `body`.
fn layout(
    title: &str,
    here: Option<Nav>,
    viewer: Option<&Viewer>,
    events: Option<&str>,
    body: &str,
) -> Html<String> {
    let mut page = String::with_capacity(body.len() + 2048);
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · msbd</title><link rel=\"stylesheet\" href=\"/ui/assets/console.css\">\
         <script src=\"/ui/assets/console.js\" defer></script></head>",
        esc(title)
    );
    match events {
        Some(url) => {
            let _ = write!(page, "<body data-events=\"{}\">", esc(url));
        }
        None => page.push_str("<body>"),
    }
    if let Some(viewer) = viewer {
        page.push_str("<header><span class=\"brand\">msbd</span><nav>");
        for (nav, href, name) in [
            (Nav::Tasks, "/ui/tasks", "Tasks"),
            (Nav::Queue, "/ui/queue", "Queue"),
            (Nav::Sessions, "/ui/sessions", "Sessions"),
            (Nav::Supervision, "/ui/supervision", "Supervision"),
        ] {
            let class = if Some(nav) == here {
                " class=\"here\""
            } else {
                ""
            };
            let _ = write!(page, "<a href=\"{href}\"{class}>{name}</a>");
        }
        page.push_str("</nav><span class=\"who\">");
        if events.is_some() {
            page.push_str("<span id=\"live\" class=\"live off\">connecting</span>");
        }
        let role = if viewer.console.is_operator() {
            "operator".to_owned()
        } else {
            esc(viewer.console.principal())
        };
        let _ = write!(page, "<span id=\"principal\">{role}</span>");
        if viewer.signed_in {
            let _ = write!(
                page,
                "<form class=\"inline\" method=\"post\" action=\"/ui/logout\">{}<button>Sign out</button></form>",
                csrf_field(viewer)
            );
        }
        page.push_str("</span></header>");
    }
    let _ = write!(page, "<main>{body}</main></body></html>");
    Html(page)
}

fn csrf_field(viewer: &Viewer) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&viewer.csrf)
    )
}

/// A button that posts to `action`.
fn button(
    viewer: &Viewer,
    action: &str,
    label: &str,
    confirm: Option<&str>,
    danger: bool,
) -> String {
    let confirm = confirm
        .map(|c| format!(" data-confirm=\"{}\"", esc(c)))
        .unwrap_or_default();
    let class = if danger { " class=\"danger\"" } else { "" };
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\"{confirm}>{}<button{class} name=\"go\" value=\"1\">{}</button></form>",
        esc(action),
        csrf_field(viewer),
        esc(label)
    )
}

fn flash(flash: &Flash) -> String {
    match (&flash.error, &flash.done) {
        (Some(error), _) => format!(
            "<div class=\"flash error\" id=\"flash\">{}</div>",
            esc(error)
        ),
        (None, Some(done)) => format!("<div class=\"flash\" id=\"flash\">{}</div>", esc(done)),
        _ => String::new(),
    }
}

fn status_badge(status: &str, id: Option<&str>) -> String {
    let id = id.map(|id| format!(" id=\"{id}\"")).unwrap_or_default();
    format!(
        "<span class=\"status s-{}\"{id}>{}</span>",
        esc(status),
        esc(status)
    )
}

fn eta_text(seconds: &Value) -> String {
    match seconds.as_f64() {
        None => String::new(),
        Some(s) if s < 60.0 => format!("{} s", s.round()),
        Some(s) => format!("{} min", (s / 60.0).round()),
    }
}

/// A size in bytes, in KiB, MiB or GiB.
fn bytes_text(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// The login form.
pub(super) fn login_page(error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<div class=\"flash error\" id=\"flash\">{}</div>", esc(e)))
        .unwrap_or_default();
    layout(
        "Sign in",
        None,
        None,
        None,
        &format!(
            "<form class=\"login\" method=\"post\" action=\"/ui/login\"><h1>msbd console</h1>{error}\
             <label for=\"token\">Token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" autofocus required>\
             <button type=\"submit\" id=\"sign-in\">Sign in</button>\
             <p class=\"muted\">The operator's token (MSB_OPERATOR_TOKEN) shows every task; MSB_AUTH_TOKEN shows its own.</p></form>"
        ),
    )
}

/// An error page.
pub(super) fn error_page(status: StatusCode, message: &str) -> Html<String> {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        None,
        None,
        None,
        &format!(
            "<h1>{} {}</h1><div class=\"flash error\" id=\"flash\">{}</div><p><a href=\"/ui/tasks\">Back to the console</a></p>",
            status.as_u16(),
            esc(status.canonical_reason().unwrap_or("")),
            esc(message)
        ),
    )
}

/// A page that could not show what it was asked for.
pub(super) fn problem_page(viewer: &Viewer, title: &str, error: &ConsoleError) -> Html<String> {
    layout(
        title,
        None,
        Some(viewer),
        None,
        &format!(
            "<h1>{}</h1><div class=\"flash error\" id=\"flash\">{}: {}<br>{}</div>",
            esc(title),
            esc(&error.code),
            esc(&error.message),
            esc(&error.hint)
        ),
    )
}

const STATUSES: [&str; 10] = [
    "all",
    "active",
    "pending",
    "scheduled",
    "running",
    "paused",
    "completed",
    "failed",
    "timeout",
    "cancelled",
];

/// The task list.
pub(super) fn tasks_page(
    viewer: &Viewer,
    query: &TasksQuery,
    list: Result<Value, ConsoleError>,
) -> Html<String> {
    let operator = viewer.console.is_operator();
    let mut body = String::new();
    body.push_str(&flash(&query.flash));
    body.push_str("<h1>Tasks</h1><form class=\"filters\" method=\"get\" action=\"/ui/tasks\">");
    let current = query.status.as_deref().unwrap_or("all");
    body.push_str("<label>Status<select name=\"status\" id=\"f-status\">");
    for status in STATUSES {
        let selected = if status == current { " selected" } else { "" };
        let _ = write!(body, "<option{selected}>{status}</option>");
    }
    body.push_str("</select></label>");
    let field = |body: &mut String, label: &str, name: &str, value: &Option<String>| {
        let _ = write!(
            body,
            "<label>{label}<input name=\"{name}\" id=\"f-{name}\" value=\"{}\" size=\"12\"></label>",
            esc(value.as_deref().unwrap_or(""))
        );
    };
    field(&mut body, "Type", "type", &query.task_type);
    field(&mut body, "Tag", "tag", &query.tag);
    field(&mut body, "Session", "session", &query.session);
    if operator {
        field(&mut body, "Owner", "owner", &query.owner);
    }
    body.push_str(
        "<button type=\"submit\">Filter</button>\
         <label>Task id<input name=\"id\" id=\"f-id\" size=\"38\" placeholder=\"go to a task\"></label>\
         <button type=\"submit\">Go</button></form>",
    );
    let list = match list {
        Ok(list) => list,
        Err(error) => {
            let _ = write!(
                body,
                "<div class=\"flash error\" id=\"flash\">{}: {} ({})</div>",
                esc(&error.code),
                esc(&error.message),
                esc(&error.hint)
            );
            return layout("Tasks", Some(Nav::Tasks), Some(viewer), None, &body);
        }
    };
    let first = query.cursor.as_deref().is_none_or(str::is_empty);
    let _ = write!(
        body,
        "<table id=\"tasks\" data-first=\"{first}\" data-status=\"{}\" data-type=\"{}\" data-tag=\"{}\" data-session=\"{}\" data-owner=\"{}\">",
        esc(current),
        esc(query.task_type.as_deref().unwrap_or("")),
        esc(query.tag.as_deref().unwrap_or("")),
        esc(query.session.as_deref().unwrap_or("")),
        esc(query.owner.as_deref().unwrap_or("")),
    );
    body.push_str("<thead><tr><th>Task</th><th>Type</th><th>Status</th><th>Progress</th><th>ETA</th><th class=\"num\">Priority</th>");
    if operator {
        body.push_str("<th>Owner</th>");
    }
    body.push_str("<th>Session</th><th>Created</th></tr></thead><tbody>");
    let tasks = list["tasks"].as_array().cloned().unwrap_or_default();
    for task in &tasks {
        body.push_str(&task_row(task, operator));
    }
    body.push_str("</tbody></table>");
    if tasks.is_empty() {
        body.push_str("<p id=\"no-tasks\" class=\"muted\">No tasks here yet. New ones appear as they are submitted.</p>");
    }
    // The row new tasks are drawn from.
    let _ = write!(
        body,
        "<template id=\"row-template\">{}</template>",
        task_row(&Value::Null, operator)
    );
    body.push_str("<p class=\"pager\">");
    if !first {
        body.push_str("<a href=\"/ui/tasks\">First page</a> ");
    }
    if let Some(next) = list["next_cursor"].as_str() {
        let mut link = format!("/ui/tasks?cursor={}", encode(next));
        for (key, value) in [
            ("status", &query.status),
            ("type", &query.task_type),
            ("tag", &query.tag),
            ("session", &query.session),
            ("owner", &query.owner),
        ] {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                let _ = write!(link, "&{key}={}", encode(value));
            }
        }
        let _ = write!(
            body,
            "<a id=\"next-page\" href=\"{}\">Next page</a>",
            esc(&link)
        );
    }
    body.push_str("</p>");
    layout(
        "Tasks",
        Some(Nav::Tasks),
        Some(viewer),
        Some("/ui/events"),
        &body,
    )
}

/// One row of the task table (`Value::Null`: the empty row of the template).
fn task_row(task: &Value, operator: bool) -> String {
    let id = task["task_id"].as_str().unwrap_or("");
    let status = task["status"].as_str().unwrap_or("");
    let progress = task["progress"].as_f64().unwrap_or(0.0);
    let mut row = format!(
        "<tr data-task-id=\"{}\" data-status=\"{}\"><td><a class=\"id\" href=\"/ui/tasks/{}\">{}</a></td>\
         <td class=\"type\">{}</td><td><span class=\"status s-{}\">{}</span></td>\
         <td><progress max=\"100\" value=\"{progress}\"></progress><span class=\"pct\">{}%</span> <span class=\"message\">{}</span></td>\
         <td class=\"eta\">{}</td><td class=\"num priority\">{}</td>",
        esc(id),
        esc(status),
        esc(&encode(id)),
        esc(id),
        val(&task["task_type"]),
        esc(status),
        esc(status),
        progress.round(),
        val(&task["progress_message"]),
        eta_text(&task["eta_seconds"]),
        val(&task["priority"]),
    );
    if operator {
        let _ = write!(row, "<td class=\"owner\">{}</td>", val(&task["owner"]));
    }
    let _ = write!(
        row,
        "<td class=\"session mono\">{}</td><td class=\"created\">{}</td></tr>",
        val(&task["session_id"]),
        val(&task["created_at"])
    );
    row
}

/// One task: its facts, its output following live, its actions.
pub(super) fn task_page(
    viewer: &Viewer,
    task: &Value,
    stdout: Option<&Value>,
    stderr: Option<&Value>,
    flash_message: &Flash,
) -> Html<String> {
    let id = task["task_id"].as_str().unwrap_or("");
    let status = task["status"].as_str().unwrap_or("");
    let action = |name: &str| format!("/ui/tasks/{}/{name}", encode(id));
    let mut body = flash(flash_message);
    let _ = write!(
        body,
        "<div id=\"task\" data-task-id=\"{}\" data-status=\"{}\"><h1>Task <span class=\"mono\">{}</span> {}</h1>",
        esc(id),
        esc(status),
        esc(id),
        status_badge(status, Some("task-status"))
    );
    body.push_str("<div class=\"actions\">");
    body.push_str(&button(
        viewer,
        &action("cancel"),
        "Cancel",
        Some("Cancel this task?"),
        true,
    ));
    body.push_str(&button(viewer, &action("pause"), "Pause", None, false));
    body.push_str(&button(viewer, &action("resume"), "Resume", None, false));
    body.push_str(&button(viewer, &action("retry"), "Retry", None, false));
    let _ = write!(
        body,
        "<form class=\"inline\" method=\"post\" action=\"{}\">{}<select name=\"priority\" id=\"priority\">",
        esc(&action("priority")),
        csrf_field(viewer)
    );
    let current = task["priority"].as_u64().unwrap_or(5);
    for p in 0..=9u64 {
        let selected = if p == current { " selected" } else { "" };
        let _ = write!(body, "<option{selected}>{p}</option>");
    }
    body.push_str("</select><button>Set priority</button></form></div>");
    let progress = task["progress"].as_f64().unwrap_or(0.0);
    let _ = write!(
        body,
        "<dl class=\"grid\"><dt>Type</dt><dd>{}</dd>\
         <dt>Progress</dt><dd><progress id=\"task-progress\" max=\"100\" value=\"{progress}\"></progress>\
         <span class=\"pct\" id=\"task-pct\">{}%</span> <span class=\"message\" id=\"task-message\">{}</span></dd>\
         <dt>ETA</dt><dd id=\"task-eta\">{}</dd>\
         <dt>Priority</dt><dd>{}</dd><dt>Owner</dt><dd>{}</dd><dt>Session</dt><dd class=\"mono\">{}</dd>\
         <dt>Attempt</dt><dd id=\"task-attempt\">{} of {}</dd><dt>Interrupted attempts</dt><dd>{}</dd>\
         <dt>Tags</dt><dd>{}</dd><dt>Created</dt><dd>{}</dd><dt>Started</dt><dd>{}</dd><dt>Finished</dt><dd>{}</dd>\
         <dt>Error</dt><dd id=\"task-error\">{}</dd></dl>",
        val(&task["task_type"]),
        progress.round(),
        val(&task["progress_message"]),
        eta_text(&task["eta_seconds"]),
        val(&task["priority"]),
        val(&task["owner"]),
        val(&task["session_id"]),
        val(&task["attempt"]),
        val(&task["max_attempts"]),
        val(&task["interrupted_attempts"]),
        task["tags"]
            .as_array()
            .map(|tags| tags.iter().map(val).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        val(&task["created_at"]),
        val(&task["started_at"]),
        val(&task["completed_at"]),
        val(&task["error"]),
    );
    body.push_str("<h2>Output</h2><div class=\"out\">");
    for (name, chunk) in [("stdout", stdout), ("stderr", stderr)] {
        let data = chunk.map(|c| val(&c["data"])).unwrap_or_default();
        let _ = write!(
            body,
            "<div><h3>{name}</h3><pre id=\"out-{name}\">{data}</pre></div>"
        );
    }
    body.push_str("</div>");
    body.push_str(&history(task));
    if let Some(attempts) = task["attempts"].as_array().filter(|a| !a.is_empty()) {
        body.push_str("<h2>Attempts</h2><table id=\"attempts\"><thead><tr><th class=\"num\">Attempt</th><th>Started</th><th>Ended</th><th>Outcome</th><th>Node</th></tr></thead><tbody>");
        for attempt in attempts {
            let _ = write!(
                body,
                "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                val(&attempt["attempt"]),
                val(&attempt["started_at"]),
                val(&attempt["ended_at"]),
                val(&attempt["outcome"]),
                node_text(&attempt["node"]),
            );
        }
        body.push_str("</tbody></table>");
    }
    if let Some(result) = task.get("result").filter(|r| !r.is_null()) {
        let _ = write!(
            body,
            "<h2>Result</h2><pre id=\"result\">{}</pre>",
            esc(&serde_json::to_string_pretty(result).unwrap_or_default())
        );
    }
    body.push_str("<h2>Parameters</h2>");
    let _ = write!(
        body,
        "<pre id=\"params\">{}</pre>",
        esc(&serde_json::to_string_pretty(&task["params"]).unwrap_or_default())
    );
    if let Some(failure) = task.get("failure").filter(|f| !f.is_null()) {
        let _ = write!(
            body,
            "<h2>Failure</h2><pre id=\"failure\">{}</pre>",
            esc(&serde_json::to_string_pretty(failure).unwrap_or_default())
        );
    }
    body.push_str("</div>");
    let cursor = |chunk: Option<&Value>| chunk.and_then(|c| c["next_cursor"].as_u64()).unwrap_or(0);
    let events = format!(
        "/ui/tasks/{}/events?stdout={}&stderr={}",
        encode(id),
        cursor(stdout),
        cursor(stderr)
    );
    layout(
        &format!("Task {id}"),
        Some(Nav::Tasks),
        Some(viewer),
        Some(&events),
        &body,
    )
}

/// Where an attempt ran: its node on a shared store; on a store one msbd owns, this process.
fn node_text(node: &Value) -> String {
    if node.is_null() {
        "this msbd".to_owned()
    } else {
        val(node)
    }
}

/// A task's status history, oldest first, from what msbd keeps of it: its submission, each
/// ended attempt's start and end (the last 20), the attempt under way, a wait for a start time
/// or retry, and its end. Pauses and cancel requests are not kept, so they are not in it.
fn history(task: &Value) -> String {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut push = |at: &Value, status: &str, what: String| {
        if let Some(at) = at.as_str() {
            rows.push((at.to_owned(), status.to_owned(), what));
        }
    };
    push(&task["created_at"], "pending", "submitted".to_owned());
    let attempts = task["attempts"].as_array().cloned().unwrap_or_default();
    let ended = attempts
        .last()
        .and_then(|a| a["attempt"].as_u64())
        .unwrap_or(0);
    for attempt in &attempts {
        let n = attempt["attempt"].as_u64().unwrap_or(0);
        let node = attempt["node"]
            .as_str()
            .map(|node| format!(" on {node}"))
            .unwrap_or_default();
        push(
            &attempt["started_at"],
            "running",
            format!("attempt {n} started{node}"),
        );
        let outcome = attempt["outcome"].as_str().unwrap_or("");
        push(
            &attempt["ended_at"],
            outcome,
            format!("attempt {n} ended: {outcome}"),
        );
    }
    let status = task["status"].as_str().unwrap_or("");
    let current = task["attempt"].as_u64().unwrap_or(0);
    if current > ended && matches!(status, "running" | "paused") {
        push(
            &task["started_at"],
            "running",
            format!("attempt {current} started (under way)"),
        );
    }
    if status == "scheduled" {
        push(&task["run_at"], "scheduled", "may start".to_owned());
    }
    if !task["completed_at"].is_null() {
        push(&task["completed_at"], status, format!("ended {status}"));
    }
    let mut html = String::from(
        "<h2>History</h2><table id=\"history\"><thead><tr><th>When</th><th>Status</th><th>What</th></tr></thead><tbody>",
    );
    for (at, status, what) in rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&at),
            status_badge(&status, None),
            esc(&what)
        );
    }
    html.push_str("</tbody></table>");
    html
}

/// The nodes sharing a PostgreSQL store, its maintenance leader, and its database.
fn cluster_section(cluster: &Value) -> String {
    let mut html = String::from(
        "<h2>Cluster</h2><table id=\"nodes\"><thead><tr><th>Node</th><th>Role</th><th>Connected since</th><th>From</th></tr></thead><tbody>",
    );
    for node in cluster["nodes"].as_array().into_iter().flatten() {
        let mut role = Vec::new();
        if node["is_leader"].as_bool() == Some(true) {
            role.push("maintenance leader");
        }
        if node["is_self"].as_bool() == Some(true) {
            role.push("this node");
        }
        let _ = write!(
            html,
            "<tr data-node=\"{}\"><td>{}</td><td class=\"role\">{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            val(&node["name"]),
            val(&node["name"]),
            esc(&role.join(", ")),
            val(&node["connected_since"]),
            val(&node["client_addr"]),
        );
    }
    html.push_str("</tbody></table>");
    if !cluster["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n["is_leader"].as_bool() == Some(true))
    {
        html.push_str("<p class=\"flash error\" id=\"no-leader\">No node holds the maintenance lock now: expired leases are not taken back and old tasks are not pruned until one does (a node tries every few seconds).</p>");
    }
    let db = &cluster["database"];
    let number = |v: &Value| v.as_i64().map_or_else(|| "—".to_owned(), |n| n.to_string());
    let _ = write!(
        html,
        "<dl class=\"grid\" id=\"database\"><dt>PostgreSQL</dt><dd>{}</dd><dt>Database size</dt><dd>{}</dd>\
         <dt>Tasks (live rows)</dt><dd>{}</dd><dt>Dead rows</dt><dd>{}</dd><dt>Last vacuum</dt><dd>{}</dd>\
         <dt>Connections</dt><dd>{} of {}</dd></dl>",
        val(&db["server_version"]),
        db["database_size_bytes"]
            .as_u64()
            .map_or_else(|| "—".to_owned(), bytes_text),
        number(&db["live_tasks"]),
        number(&db["dead_tasks"]),
        if db["last_vacuum"].is_null() {
            "never".to_owned()
        } else {
            val(&db["last_vacuum"])
        },
        number(&db["connections"]),
        number(&db["max_connections"]),
    );
    html
}

/// The queue: depth by status and type, pause and resume.
pub(super) fn queue_page(
    viewer: &Viewer,
    queue: Result<Value, ConsoleError>,
    charts: &str,
    flash_message: &Flash,
) -> Html<String> {
    let mut body = flash(flash_message);
    body.push_str("<h1>Queue</h1>");
    let queue = match queue {
        Ok(queue) => queue,
        Err(error) => {
            let _ = write!(
                body,
                "<div class=\"flash error\">{}</div>",
                esc(&error.to_string())
            );
            return layout("Queue", Some(Nav::Queue), Some(viewer), None, &body);
        }
    };
    let paused = queue["queue_paused"].as_bool().unwrap_or(false);
    body.push_str("<div class=\"cards\">");
    for (key, label) in [
        ("total_queued", "waiting"),
        ("running_tasks", "running"),
        ("paused_tasks", "paused"),
        ("total_tasks_completed", "completed"),
        ("total_tasks_failed", "failed"),
        ("total_tasks_cancelled", "cancelled"),
        ("max_concurrent", "concurrency"),
    ] {
        let _ = write!(
            body,
            "<div class=\"card\"><div class=\"n\" id=\"q-{key}\">{}</div><div class=\"l\">{label}</div></div>",
            val(&queue[key])
        );
    }
    body.push_str("</div>");
    let _ = write!(
        body,
        "<p>The queue is <strong id=\"queue-state\">{}</strong>. ",
        if paused { "paused" } else { "running" }
    );
    if viewer.console.is_operator() {
        body.push_str(&if paused {
            button(viewer, "/ui/queue/resume", "Resume the queue", None, false)
        } else {
            button(
                viewer,
                "/ui/queue/pause",
                "Pause the queue",
                Some("Pause the queue? No new task starts until it is resumed."),
                true,
            )
        });
    }
    body.push_str("</p>");
    if viewer.console.is_operator() {
        let _ = write!(
            body,
            "<form class=\"inline\" method=\"post\" action=\"/ui/queue/limits\">{}\
             <label>At most <input type=\"number\" name=\"max_concurrent\" id=\"limit-all\" min=\"1\" max=\"1024\" value=\"{}\" required> tasks running at once</label> \
             <button id=\"set-limit-all\">Set</button></form>",
            csrf_field(viewer),
            val(&queue["max_concurrent"])
        );
    }
    body.push_str(charts);
    let paused_types: Vec<&str> = queue["paused_types"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let columns = [
        "pending",
        "scheduled",
        "running",
        "paused",
        "completed",
        "failed",
        "timeout",
        "cancelled",
    ];
    body.push_str("<h2>By type</h2><table id=\"by-type\"><thead><tr><th>Type</th>");
    for column in columns {
        let _ = write!(body, "<th class=\"num\">{column}</th>");
    }
    body.push_str("<th class=\"num\">limit</th><th></th></tr></thead><tbody>");
    // Every type msbd runs, and any other the store holds tasks of.
    let mut names: Vec<String> = queue["task_types"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(types) = queue["by_type"].as_object() {
        names.extend(types.keys().cloned());
    }
    names.sort();
    names.dedup();
    for name in &names {
        let counts = &queue["by_type"][name.as_str()];
        let _ = write!(
            body,
            "<tr data-type=\"{}\"><td>{}</td>",
            esc(name),
            esc(name)
        );
        for column in columns {
            let _ = write!(
                body,
                "<td class=\"num\">{}</td>",
                counts[column].as_u64().unwrap_or(0)
            );
        }
        let limit = &queue["type_limits"][name.as_str()];
        let _ = write!(
            body,
            "<td class=\"num limit\">{}</td><td>",
            if limit.is_null() {
                "—".to_owned()
            } else {
                val(limit)
            }
        );
        if viewer.console.is_operator() {
            let _ = write!(
                body,
                "<form class=\"inline\" method=\"post\" action=\"/ui/queue/limits\">{}<input type=\"hidden\" name=\"task_type\" value=\"{}\">\
                     <input type=\"number\" name=\"max_concurrent\" min=\"0\" max=\"1024\" size=\"4\" value=\"{}\" title=\"most running at once; 0 removes the limit\" required>\
                     <button>Set limit</button></form> ",
                csrf_field(viewer),
                esc(name),
                limit.as_u64().unwrap_or(0)
            );
            let type_paused = paused_types.contains(&name.as_str());
            let (action, label) = if type_paused {
                ("resume", "Resume type")
            } else {
                ("pause", "Pause type")
            };
            let _ = write!(
                body,
                "<form class=\"inline\" method=\"post\" action=\"/ui/queue/{action}\">{}<input type=\"hidden\" name=\"task_type\" value=\"{}\"><button>{label}</button></form>",
                csrf_field(viewer),
                esc(name)
            );
        }
        body.push_str("</td></tr>");
    }
    body.push_str("</tbody></table>");
    layout("Queue", Some(Nav::Queue), Some(viewer), None, &body)
}

/// The live sessions.
pub(super) fn sessions_page(
    viewer: &Viewer,
    sessions: Result<Value, ConsoleError>,
    flash_message: &Flash,
) -> Html<String> {
    let mut body = flash(flash_message);
    body.push_str("<h1>Sessions</h1>");
    let sessions = match sessions {
        Ok(sessions) => sessions,
        Err(error) => {
            let _ = write!(
                body,
                "<div class=\"flash error\">{}</div>",
                esc(&error.to_string())
            );
            return layout("Sessions", Some(Nav::Sessions), Some(viewer), None, &body);
        }
    };
    let operator = viewer.console.is_operator();
    let _ = write!(
        body,
        "<p>Every sandbox runs under <span class=\"mono\" id=\"isolation\">{}</span>.</p>",
        val(&sessions["isolation"])
    );
    body.push_str("<table id=\"sessions\"><thead><tr><th>Session</th>");
    if operator {
        body.push_str("<th>Owner</th>");
    }
    body.push_str("<th>Status</th><th>Template</th><th>Flavor</th><th>Network</th><th class=\"num\">Running tasks</th><th class=\"num\">Memory</th><th class=\"num\">CPU</th><th class=\"num\">Processes</th><th class=\"num\">Idle</th><th></th></tr></thead><tbody>");
    let list = sessions["sessions"].as_array().cloned().unwrap_or_default();
    for session in &list {
        let id = session["session_id"].as_str().unwrap_or("");
        let _ = write!(
            body,
            "<tr data-session-id=\"{}\"><td class=\"mono\">{}</td>",
            esc(id),
            esc(id)
        );
        if operator {
            let _ = write!(body, "<td>{}</td>", val(&session["owner"]));
        }
        let _ = write!(
            body,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num memory\">{}</td><td class=\"num cpu\">{}</td><td class=\"num processes\">{}</td>\
             <td class=\"num\">{} s</td><td>{}</td></tr>",
            status_badge(session["status"].as_str().unwrap_or(""), None),
            val(&session["template"]),
            val(&session["flavor"]),
            val(&session["network"]),
            val(&session["running_tasks"]),
            session["usage"]["memory_bytes"]
                .as_u64()
                .map_or_else(|| "—".to_owned(), bytes_text),
            session["usage"]["cpu_seconds"]
                .as_f64()
                .map_or_else(|| "—".to_owned(), |s| format!("{s:.2} s")),
            session["usage"]["processes"]
                .as_u64()
                .map_or_else(|| "—".to_owned(), |n| n.to_string()),
            session["idle_seconds"].as_f64().unwrap_or(0.0).round(),
            button(
                viewer,
                &format!("/ui/sessions/{}/stop", encode(id)),
                "Stop",
                Some("Stop this session? Its processes are killed and its files deleted."),
                true
            )
        );
    }
    body.push_str("</tbody></table>");
    if list.is_empty() {
        body.push_str("<p class=\"muted\">No live sessions.</p>");
    }
    layout("Sessions", Some(Nav::Sessions), Some(viewer), None, &body)
}

/// The supervised loops and the daemon's health.
pub(super) fn supervision_page(
    viewer: &Viewer,
    health: &Value,
    cluster: Option<Result<Value, ConsoleError>>,
    flash_message: &Flash,
) -> Html<String> {
    let mut body = flash(flash_message);
    let overall = health["status"].as_str().unwrap_or("unknown");
    let _ = write!(
        body,
        "<h1>Supervision {}</h1><p class=\"muted\">Up {} s.</p>",
        status_badge(overall, Some("overall-health")),
        health["uptime_seconds"].as_f64().unwrap_or(0.0).round()
    );
    body.push_str("<h2>Components</h2><table id=\"components\"><thead><tr><th>Component</th><th>Status</th><th>Details</th></tr></thead><tbody>");
    if let Some(components) = health["components"].as_object() {
        for (name, component) in components {
            let status = component["status"].as_str().unwrap_or("");
            let detail = component["problem"]
                .as_str()
                .or_else(|| component["level"].as_str())
                .unwrap_or("");
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(name),
                status_badge(status, None),
                esc(detail)
            );
        }
    }
    body.push_str("</tbody></table>");
    body.push_str("<h2>Background loops</h2><table id=\"loops\"><thead><tr><th>Loop</th><th>State</th><th class=\"num\">Cycles</th><th class=\"num\">Errors</th><th class=\"num\">Restarts</th><th>Last error</th><th></th></tr></thead><tbody>");
    let operator = viewer.console.is_operator();
    // The loops sit beside the session and resource managers, each with its state.
    if let Some(components) = health["background_tasks"]["components"].as_object() {
        for (name, child) in components.iter().filter(|(_, c)| c.get("state").is_some()) {
            let state = child["state"].as_str().unwrap_or("");
            let _ = write!(
                body,
                "<tr data-loop=\"{}\"><td>{}</td><td class=\"state\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>",
                esc(name),
                esc(name),
                status_badge(state, None),
                val(&child["cycles"]),
                val(&child["errors"]),
                val(&child["restarts"]),
                val(&child["last_error"]),
            );
            if operator {
                let base = format!("/ui/supervision/{}", encode(name));
                if child["pausable"].as_bool().unwrap_or(false) {
                    if state == "paused" {
                        body.push_str(&button(
                            viewer,
                            &format!("{base}/resume"),
                            "Resume",
                            None,
                            false,
                        ));
                    } else {
                        body.push_str(&button(
                            viewer,
                            &format!("{base}/pause"),
                            "Pause",
                            None,
                            false,
                        ));
                    }
                }
                body.push_str(&button(
                    viewer,
                    &format!("{base}/restart"),
                    "Restart",
                    None,
                    false,
                ));
            }
            body.push_str("</td></tr>");
        }
    }
    body.push_str("</tbody></table>");
    if !operator {
        body.push_str(
            "<p class=\"muted\">Only the operator may pause, resume or restart loops.</p>",
        );
    }
    match cluster {
        Some(Ok(cluster)) if !cluster.is_null() => body.push_str(&cluster_section(&cluster)),
        Some(Err(error)) => {
            let _ = write!(
                body,
                "<h2>Cluster</h2><div class=\"flash error\" id=\"cluster-error\">{}: {} ({})</div>",
                esc(&error.code),
                esc(&error.message),
                esc(&error.hint)
            );
        }
        _ => {}
    }
    layout(
        "Supervision",
        Some(Nav::Supervision),
        Some(viewer),
        None,
        &body,
    )
}
