// msbd's web console: live updates over server-sent events. No framework, no build step; the
// pages work without it (they show what was true when loaded).
"use strict";

(function () {
  const body = document.body;

  function text(el, value) {
    if (el) el.textContent = value == null ? "" : String(value);
  }

  function percent(p) {
    return Math.round(p || 0) + "%";
  }

  function eta(seconds) {
    if (seconds == null) return "";
    if (seconds < 60) return Math.round(seconds) + " s";
    return Math.round(seconds / 60) + " min";
  }

  // One row of the task table from a task as the events carry it.
  function fillRow(row, task) {
    row.dataset.status = task.status;
    const status = row.querySelector(".status");
    if (status) {
      text(status, task.status);
      status.className = "status s-" + task.status;
    }
    const bar = row.querySelector("progress");
    if (bar) bar.value = task.progress || 0;
    text(row.querySelector(".pct"), percent(task.progress));
    text(row.querySelector(".message"), task.progress_message || "");
    text(row.querySelector(".eta"), eta(task.eta_seconds));
    text(row.querySelector(".priority"), task.priority);
  }

  function newRow(task) {
    const template = document.getElementById("row-template");
    if (!template) return null;
    const row = template.content.firstElementChild.cloneNode(true);
    row.dataset.taskId = task.task_id;
    const link = row.querySelector("a.id");
    link.href = "/ui/tasks/" + encodeURIComponent(task.task_id);
    text(link, task.task_id);
    text(row.querySelector(".type"), task.task_type);
    text(row.querySelector(".owner"), task.owner || "");
    text(row.querySelector(".session"), task.session_id || "");
    text(row.querySelector(".created"), task.created_at);
    fillRow(row, task);
    return row;
  }

  function matchesFilter(table, task) {
    const f = table.dataset;
    if (f.first !== "true") return false;
    const active = ["pending", "scheduled", "running", "paused"];
    if (f.status && f.status !== "all") {
      if (f.status === "active" ? !active.includes(task.status) : f.status !== task.status) return false;
    }
    if (f.type && f.type !== task.task_type) return false;
    if (f.session && f.session !== task.session_id) return false;
    if (f.owner && f.owner !== task.owner) return false;
    if (f.tag && !(task.tags || []).includes(f.tag)) return false;
    return true;
  }

  function onTask(task) {
    const table = document.getElementById("tasks");
    if (table) {
      const rows = table.querySelector("tbody");
      let row = rows.querySelector('tr[data-task-id="' + CSS.escape(task.task_id) + '"]');
      if (row) {
        fillRow(row, task);
      } else if (matchesFilter(table, task)) {
        row = newRow(task);
        if (row) rows.insertBefore(row, rows.firstChild);
        const empty = document.getElementById("no-tasks");
        if (empty) empty.remove();
      }
    }
    const page = document.getElementById("task");
    if (page && page.dataset.taskId === task.task_id) {
      const status = document.getElementById("task-status");
      text(status, task.status);
      if (status) status.className = "status s-" + task.status;
      const bar = document.getElementById("task-progress");
      if (bar) bar.value = task.progress || 0;
      text(document.getElementById("task-pct"), percent(task.progress));
      text(document.getElementById("task-message"), task.progress_message || "");
      text(document.getElementById("task-eta"), eta(task.eta_seconds));
      text(document.getElementById("task-error"), task.error || "");
      text(document.getElementById("task-attempt"), task.attempt + " of " + task.max_attempts);
      page.dataset.status = task.status;
    }
  }

  function onOutput(chunk) {
    const pane = document.getElementById("out-" + chunk.stream);
    if (!pane) return;
    const follow = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
    pane.append(document.createTextNode(chunk.text));
    // Keep the pane bounded: a long run's early output is on the server, not in the page.
    const max = 262144;
    if (pane.textContent.length > max) {
      pane.textContent = pane.textContent.slice(-max);
    }
    if (follow) pane.scrollTop = pane.scrollHeight;
  }

  const source = body.dataset.events;
  if (source && window.EventSource) {
    const events = new EventSource(source);
    const live = document.getElementById("live");
    events.addEventListener("open", function () {
      text(live, "live");
      if (live) live.className = "live on";
    });
    events.addEventListener("error", function () {
      text(live, "reconnecting");
      if (live) live.className = "live off";
    });
    events.addEventListener("task", function (e) {
      onTask(JSON.parse(e.data));
    });
    events.addEventListener("output", function (e) {
      onOutput(JSON.parse(e.data));
    });
    // The server fell behind the queue's events: what the page shows may be stale.
    events.addEventListener("resync", function () {
      window.location.reload();
    });
  }

  // Ask before destructive actions.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  });
})();
