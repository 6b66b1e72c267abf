//! A small MCP client of msbd's tools over streamable HTTP, for msbd's command line: connect
//! with a bearer token ([`ToolClient::connect`]), call a tool and get its structured answer as
//! JSON ([`ToolClient::call`]), and tell apart why a call could not be made ([`ClientError`]:
//! msbd unreachable, the token refused, a tool error, a tool that is not served, anything
//! else).
//!
//! It knows MCP and JSON-RPC (rmcp's client) so that the command line does not have to; the
//! command line decides what to print and with which exit code.

use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, ErrorCode, Implementation,
};
use rmcp::service::{ClientInitializeError, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{
    StreamableHttpClientTransportConfig, StreamableHttpError,
};
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::Value;

/// Why a connection or a tool call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the address, or what answered is not an MCP server.
    #[error("cannot connect to {url}: {reason}")]
    Unreachable {
        /// The MCP endpoint tried.
        url: String,
        /// What went wrong, as the HTTP client said it.
        reason: String,
    },
    /// The server refused the bearer token (or its absence): HTTP 401 or 403.
    #[error("{url} refused the bearer token")]
    Unauthorized {
        /// The MCP endpoint tried.
        url: String,
    },
    /// The tool answered with a tool error: its text is msbd's `Error CODE: …` and
    /// `What to do: …`.
    #[error("{text}")]
    Tool {
        /// The tool called.
        tool: String,
        /// The error's code (`TASK_NOT_FOUND`, `INVALID_ARGUMENT`…), when the text has one.
        code: Option<String>,
        /// The whole text of the tool error.
        text: String,
    },
    /// The server does not serve this tool (JSON-RPC `-32602` "tool not found"), such as a
    /// supervision tool that is switched off.
    #[error("the server does not offer the tool {tool}")]
    UnknownTool {
        /// The tool called.
        tool: String,
    },
    /// The server answered something else than expected: a JSON-RPC error, a lost connection,
    /// an answer without structured content.
    #[error("{tool}: {reason}")]
    Protocol {
        /// The tool called (or `initialize`).
        tool: String,
        /// What went wrong.
        reason: String,
    },
}

/// An open MCP session with msbd.
pub struct ToolClient {
    /// The rmcp client service.
    service: RunningService<RoleClient, ClientConfig>,
    /// The MCP endpoint.
    url: String,
}

impl std::fmt::Debug for ToolClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolClient")
            .field("url", &self.url)
            .finish()
    }
}

impl ToolClient {
    /// Opens an MCP session at `url` (msbd's `/mcp` endpoint), sending `token` as bearer
    /// token when given; `client_name` and `client_version` are the client's `initialize`
    /// info.
    ///
    /// # Errors
    ///
    /// [`ClientError::Unreachable`] when nothing answers there, [`ClientError::Unauthorized`]
    /// when the token is refused, [`ClientError::Protocol`] for anything else.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        client_name: &str,
        client_version: &str,
    ) -> Result<ToolClient, ClientError> {
        let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
        if let Some(token) = token {
            config = config.auth_header(token.to_owned());
        }
        let transport = StreamableHttpClientTransport::from_config(config);
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new(client_name.to_owned(), client_version.to_owned()),
        );
        match info.serve(transport).await {
            Ok(service) => Ok(ToolClient {
                service,
                url: url.to_owned(),
            }),
            Err(error) => Err(initialize_error(url, &error)),
        }
    }

    /// Calls `tool` with `arguments` (a JSON object) and returns its structured answer.
    ///
    /// # Errors
    ///
    /// [`ClientError::Tool`] when the tool answers with a tool error, [`ClientError::UnknownTool`]
    /// when the server does not serve it, [`ClientError::Unauthorized`] or
    /// [`ClientError::Unreachable`] when the connection is refused or lost, and
    /// [`ClientError::Protocol`] otherwise.
    pub async fn call(&self, tool: &str, arguments: Value) -> Result<Value, ClientError> {
        let arguments = match arguments {
            Value::Object(map) => map,
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(ClientError::Protocol {
                    tool: tool.to_owned(),
                    reason: format!("the arguments must be a JSON object, not {other}"),
                });
            }
        };
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
        let result = self
            .service
            .call_tool(params)
            .await
            .map_err(|error| self.call_error(tool, &error))?;
        if result.is_error == Some(true) {
            let text = result
                .content
                .iter()
                .filter_map(|content| content.as_text().map(|text| text.text.as_str()))
                .collect::<Vec<_>>()
                .join("\n");
            return Err(ClientError::Tool {
                tool: tool.to_owned(),
                code: error_code(&text).map(str::to_owned),
                text,
            });
        }
        result
            .structured_content
            .ok_or_else(|| ClientError::Protocol {
                tool: tool.to_owned(),
                reason: "the answer has no structured content".to_owned(),
            })
    }

    /// Ends the MCP session (the server forgets it at once rather than when it expires).
    pub async fn close(self) {
        let _ = self.service.cancel().await;
    }

    /// The error of a failed call.
    fn call_error(&self, tool: &str, error: &ServiceError) -> ClientError {
        if let ServiceError::McpError(data) = error {
            if data.code == ErrorCode::INVALID_PARAMS && data.message.contains("tool not found") {
                return ClientError::UnknownTool {
                    tool: tool.to_owned(),
                };
            }
            return ClientError::Protocol {
                tool: tool.to_owned(),
                reason: format!("JSON-RPC error {}: {}", data.code.0, data.message),
            };
        }
        match error {
            ServiceError::TransportSend(transport) => {
                transport_error(&self.url, tool, &*transport.error)
            }
            // The server went away or ended the session.
            ServiceError::TransportClosed => ClientError::Unreachable {
                url: self.url.clone(),
                reason: "the connection was closed".to_owned(),
            },
            other => transport_error(&self.url, tool, other),
        }
    }
}

/// The code of a tool error's text, `Error CODE: what happened`.
pub fn error_code(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("Error ")?;
    let (code, _) = rest.split_once(':')?;
    (!code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')).then_some(code)
}

/// The error of a failed `initialize`.
fn initialize_error(url: &str, error: &ClientInitializeError) -> ClientError {
    match error {
        ClientInitializeError::JsonRpcError(data) => ClientError::Protocol {
            tool: "initialize".to_owned(),
            reason: format!("JSON-RPC error {}: {}", data.code.0, data.message),
        },
        ClientInitializeError::TransportError { error, .. } => {
            transport_error(url, "initialize", &*error.error)
        }
        other => transport_error(url, "initialize", other),
    }
}

/// Classifies a transport failure by what its chain of sources holds: a 401 or 403 answer,
/// else a failure to reach the server (connection refused, DNS, timeout, an answer that is not
/// MCP), else something else.
fn transport_error(
    url: &str,
    tool: &str,
    error: &(dyn std::error::Error + 'static),
) -> ClientError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut reasons = Vec::new();
    let mut unreachable = false;
    while let Some(current) = source {
        let mut next = current.source();
        if let Some(http) = current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            match http {
                StreamableHttpError::AuthRequired(_)
                | StreamableHttpError::InsufficientScope(_) => {
                    return ClientError::Unauthorized {
                        url: url.to_owned(),
                    };
                }
                StreamableHttpError::Client(inner) => {
                    unreachable = true;
                    // Its source is not declared: read on from the HTTP client's error.
                    next = Some(inner);
                }
                StreamableHttpError::UnexpectedContentType(_)
                | StreamableHttpError::UnexpectedServerResponse(_)
                | StreamableHttpError::Io(_) => unreachable = true,
                _ => {}
            }
        }
        if current.downcast_ref::<reqwest::Error>().is_some() {
            unreachable = true;
        }
        let text = current.to_string();
        if !reasons.iter().any(|seen: &String| seen.contains(&text)) {
            reasons.push(text);
        }
        source = next;
    }
    let reason = reasons.last().cloned().unwrap_or_default();
    if unreachable {
        ClientError::Unreachable {
            url: url.to_owned(),
            reason,
        }
    } else {
        ClientError::Protocol {
            tool: tool.to_owned(),
            reason: reasons.join(": "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_code;

    #[test]
    fn the_code_of_a_tool_error_is_read_from_its_first_line() {
        assert_eq!(
            error_code("Error TASK_NOT_FOUND: no task with id \"x\"\nWhat to do: check"),
            Some("TASK_NOT_FOUND")
        );
        assert_eq!(error_code("exit code 3 after 12 ms"), None);
        assert_eq!(error_code("Error : nothing"), None);
        assert_eq!(error_code("Error lower: nothing"), None);
    }
}
