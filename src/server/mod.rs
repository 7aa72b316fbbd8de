//! The only tokio, WebSocket and HTTP code (DESIGN.md sections 4 and 8). Arrives with the
//! server issue.
