//! `msbd sessions`: the tool `get_sessions`, as a table.

use clap::Args;
use serde_json::{Value, json};

use super::table::{Column, Table};
use super::{ConnectionArgs, Context, Exit, print_json, seconds_text, text};

/// `msbd sessions`.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub(super) connection: ConnectionArgs,
    /// Only this session.
    #[arg(long = "session", value_name = "SESSION")]
    session_id: Option<String>,
}

/// Lists the live sessions.
pub(super) async fn run(context: &Context, args: &SessionsArgs) -> Exit {
    let client = match context.connect().await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    let arguments = match &args.session_id {
        Some(session) => json!({"session_id": session}),
        None => json!({}),
    };
    let answer = client.call("get_sessions", arguments).await;
    client.close().await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => return context.report(&error),
    };
    if context.out.json {
        print_json(&answer);
        return Exit::Success;
    }
    let sessions = answer["sessions"].as_array().cloned().unwrap_or_default();
    if sessions.is_empty() {
        println!("No live sessions.");
        return Exit::Success;
    }
    let mut table = Table::new(vec![
        Column::fixed("SESSION"),
        Column::fixed("STATUS"),
        Column::shrinkable("TEMPLATE"),
        Column::shrinkable("FLAVOR"),
        Column::shrinkable("NETWORK"),
        Column::fixed("RUNNING"),
        Column::fixed("IDLE"),
    ]);
    for session in &sessions {
        let network = match &session["network"] {
            Value::String(mode) => mode.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        table.row(vec![
            (text(session, "session_id").to_owned(), None),
            (text(session, "status").to_owned(), None),
            (text(session, "template").to_owned(), None),
            (text(session, "flavor").to_owned(), None),
            (network, None),
            (session["running_tasks"].to_string(), None),
            (
                session["idle_seconds"]
                    .as_f64()
                    .map(seconds_text)
                    .unwrap_or_default(),
                None,
            ),
        ]);
    }
    print!("{}", table.render(context.out.width));
    Exit::Success
}
