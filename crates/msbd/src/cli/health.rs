//! `msbd health`: the tool `health_check` when msbd offers it (the supervision tools, off by
//! default over HTTP), else msbd's `/healthz` with the token (the overall status and every
//! component that is not healthy). Exit code 1 when msbd is unhealthy.

use clap::Args;
use mcp_tools::client::ClientError;
use serde_json::Value;

use super::{ConnectionArgs, Context, Exit, Output, print_json, text};

/// `msbd health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub(super) connection: ConnectionArgs,
}

/// Checks msbd's health.
pub(super) async fn run(context: &Context) -> Exit {
    let client = match context.connect().await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    let answer = client.call("health_check", Value::Null).await;
    client.close().await;
    let report = match answer {
        Ok(report) => report,
        Err(ClientError::UnknownTool { .. }) => match healthz(context).await {
            Ok(report) => report,
            Err(exit) => return exit,
        },
        Err(error) => return context.report(&error),
    };
    if context.out.json {
        print_json(&report);
    } else {
        print!("{}", health_text(&context.out, &report));
    }
    if text(&report, "status") == "unhealthy" {
        Exit::NotCompleted
    } else {
        Exit::Success
    }
}

/// `/healthz` with the token: `{"status", "not_healthy": {component: {status, detail}}}`.
async fn healthz(context: &Context) -> Result<Value, Exit> {
    let url = format!("{}/healthz", context.base_url);
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = &context.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|error| {
        context.report(&ClientError::Unreachable {
            url: url.clone(),
            reason: error.to_string(),
        })
    })?;
    response.json::<Value>().await.map_err(|error| {
        context.report(&ClientError::Protocol {
            tool: "/healthz".to_owned(),
            reason: error.to_string(),
        })
    })
}

/// The readable layout of a health report (`health_check`'s or `/healthz`'s).
fn health_text(out: &Output, report: &Value) -> String {
    let status = text(report, "status");
    let painted = match status {
        "healthy" => out.paint(status, "32"),
        "degraded" => out.paint(status, "33"),
        _ => out.paint(status, "31"),
    };
    let mut lines = vec![format!("msbd is {painted}")];
    if let Some(uptime) = report["uptime_seconds"].as_f64() {
        lines.push(format!("up for {}", super::seconds_text(uptime)));
    }
    if let Some(components) = report["components"].as_object() {
        for (name, component) in components {
            let mut line = format!("  {name:<17} {}", text(component, "status"));
            if let Some(isolation) = component["isolation"].as_str() {
                line.push_str(&format!(" (isolation {isolation})"));
            }
            if let Some(problem) = component["problem"].as_str() {
                line.push_str(&format!(": {problem}"));
            }
            lines.push(line);
        }
    }
    if let Some(not_healthy) = report["not_healthy"].as_object() {
        if not_healthy.is_empty() && report.get("components").is_none() {
            lines.push("every component is healthy".to_owned());
        }
        for (name, component) in not_healthy {
            lines.push(format!(
                "  {name:<17} {}: {}",
                text(component, "status"),
                component["detail"]
            ));
        }
    }
    lines.iter().map(|line| format!("{line}\n")).collect()
}
