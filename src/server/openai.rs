//! An OpenAI-compatible streaming upstream (`POST /v1/chat/completions` with `stream: true`,
//! answered with server-sent events), as served by llama.cpp's server, vLLM and Ollama. Each
//! content delta becomes one `app` unit `{"token": "..."}`, charged like any unit: per message,
//! and per byte if priced. An upstream refusal, error, timeout or disconnect ends the stream
//! with `end {upstream_failed}` (after `error {upstream_failed}` saying what failed); only what
//! was delivered is billed (units are charged at delivery, not at production).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::resource::{Ended, Resource, Unit};
use crate::protocol::EndReason;

/// Largest SSE line accepted from the upstream (a guard against a runaway upstream).
const MAX_SSE_LINE_BYTES: usize = 1 << 20;

/// An OpenAI-compatible chat completions upstream.
#[derive(Debug, Clone)]
pub struct OpenAiUpstream {
    /// Base URL, e.g. `http://127.0.0.1:8081` (the path `/v1/chat/completions` is appended).
    pub base_url: String,
    /// Model name sent upstream.
    pub model: String,
    /// Bearer token, if the upstream needs one.
    pub api_key: Option<String>,
    /// Time allowed to connect and for the response headers.
    pub timeout: Duration,
}

impl OpenAiUpstream {
    /// The upstream request for a client's `request` body: `{"prompt": "..."}` becomes one user
    /// message; `{"messages": [...]}` is passed through; `maxTokens` becomes `max_tokens`.
    pub fn upstream_body(&self, request: &serde_json::Value) -> serde_json::Value {
        let messages = match request.get("messages") {
            Some(m) => m.clone(),
            None => serde_json::json!([{
                "role": "user",
                "content": request.get("prompt").and_then(|p| p.as_str()).unwrap_or_default(),
            }]),
        };
        let mut body =
            serde_json::json!({ "model": self.model, "messages": messages, "stream": true });
        if let Some(max) = request.get("maxTokens").and_then(|m| m.as_u64()) {
            // At least one: a request that asks for nothing would have the upstream process
            // its prompt for free (only delivered tokens are charged).
            body["max_tokens"] = max.max(1).into();
        }
        body
    }
}

/// The content of one SSE `data:` payload, `None` for `[DONE]` or a chunk without content.
pub fn delta_content(payload: &str) -> Option<String> {
    let chunk: serde_json::Value = serde_json::from_str(payload).ok()?;
    let content = chunk
        .get("choices")?
        .get(0)?
        .get("delta")?
        .get("content")?
        .as_str()?;
    (!content.is_empty()).then(|| content.to_string())
}

impl Resource for OpenAiUpstream {
    fn description(&self) -> String {
        format!("{} via an OpenAI-compatible upstream", self.model)
    }

    fn mime_type(&self) -> String {
        "application/json".into()
    }

    fn start(&self, request: serde_json::Value, tx: mpsc::Sender<Unit>) -> JoinHandle<Ended> {
        let url = format!(
            "{}/v1/chat/completions",
            self.base_url.trim_end_matches('/')
        );
        let body = self.upstream_body(&request);
        let api_key = self.api_key.clone();
        let timeout = self.timeout;
        tokio::spawn(async move {
            let ended = stream(url, body, api_key, timeout, tx).await;
            if let Some(failure) = &ended.failure {
                warn!("upstream: {failure}");
            }
            ended
        })
    }
}

/// Streams one completion into `tx`; returns how it ended.
async fn stream(
    url: String,
    body: serde_json::Value,
    api_key: Option<String>,
    timeout: Duration,
    tx: mpsc::Sender<Unit>,
) -> Ended {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder().connect_timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => return Ended::failed(format!("upstream client: {e}")),
    };
    let mut req = client.post(&url).json(&body);
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    let response = match tokio::time::timeout(timeout, req.send()).await {
        Ok(Ok(r)) if r.status().is_success() => r,
        Ok(Ok(r)) => {
            return Ended::failed(format!("the upstream refused the request: {}", r.status()));
        }
        Ok(Err(e)) => return Ended::failed(format!("the upstream request failed: {e}")),
        Err(_) => {
            return Ended::failed(format!(
                "the upstream did not answer within {} ms",
                timeout.as_millis()
            ));
        }
    };
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut finish: Option<String> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            // A disconnect mid-stream ends the stream: what was delivered is billed.
            Err(e) => return Ended::failed(format!("the upstream stream broke: {e}")),
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(payload) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let payload = payload.trim();
            if payload == "[DONE]" {
                return ended_by(finish.as_deref());
            }
            if let Some(reason) = finish_reason(payload) {
                finish = Some(reason);
            }
            if let Some(token) = delta_content(payload)
                && tx
                    .send(Unit::Json(serde_json::json!({ "token": token })))
                    .await
                    .is_err()
            {
                return Ended::because(EndReason::Cancelled);
            }
        }
        if buffer.len() > MAX_SSE_LINE_BYTES {
            return Ended::failed("the upstream sent an oversized line");
        }
    }
    match finish {
        Some(reason) => ended_by(Some(&reason)),
        None => Ended::failed("the upstream closed the stream before finishing its answer"),
    }
}

/// A finished answer by its OpenAI `finish_reason`: `length` is the request's token limit.
fn ended_by(finish_reason: Option<&str>) -> Ended {
    Ended::because(match finish_reason {
        Some("length") => EndReason::MaxTokens,
        _ => EndReason::Completed,
    })
}

/// The `finish_reason` of one SSE `data:` payload, if it has one.
pub fn finish_reason(payload: &str) -> Option<String> {
    let chunk: serde_json::Value = serde_json::from_str(payload).ok()?;
    Some(
        chunk
            .get("choices")?
            .get(0)?
            .get("finish_reason")?
            .as_str()?
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_requests_and_parses_deltas() {
        let up = OpenAiUpstream {
            base_url: "http://x".into(),
            model: "m".into(),
            api_key: None,
            timeout: Duration::from_secs(1),
        };
        let body = up.upstream_body(&serde_json::json!({ "prompt": "hi", "maxTokens": 5 }));
        assert_eq!(body["messages"][0]["content"], "hi");
        assert_eq!(
            (body["stream"].as_bool(), body["max_tokens"].as_u64()),
            (Some(true), Some(5))
        );
        assert_eq!(
            delta_content(r#"{"choices":[{"delta":{"content":"tok"}}]}"#).as_deref(),
            Some("tok")
        );
        assert_eq!(
            delta_content(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#),
            None
        );
        assert_eq!(delta_content("not json"), None);
    }
}
