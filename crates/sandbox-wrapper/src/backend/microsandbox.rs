//! The `microsandbox` backend: a client of the microsandbox server's JSON-RPC API.
