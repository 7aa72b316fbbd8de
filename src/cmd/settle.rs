//! `paystream settle`: the batch settler as its own process, on the store the servers share, so
//! the payee's key (or its operator's) lives on one host only. `--once` does one pass and exits
//! (cron, tests); `status` prints what is pending per payee and token.

use std::convert::Infallible;
use std::sync::Arc;

use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use clap::{Args, Subcommand};
use http_body_util::Full;
use hyper::body::Bytes;
use k256::ecdsa::SigningKey;
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::settle::{SettleMetrics, Settler};
use paystream::store::memory::MemoryStore;
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, SettlementStore};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::serve::{PAYEE_KEY_ENV, load_config, shutdown_signal};

/// Environment variable holding the settler's key: the payee's, or an operator's the payee
/// registered with `setOperator` (then cooperative closes fall back to claims: only the
/// payee's key signs `Close`). `PAYSTREAM_PAYEE_KEY` is used when it is unset.
pub const SETTLER_KEY_ENV: &str = "PAYSTREAM_SETTLER_KEY";

/// Flags of `paystream settle`.
#[derive(Debug, Args)]
pub struct SettleArgs {
    /// The same TOML configuration as `paystream serve` (`[chain]`, `[store]`, `[settle]`).
    #[arg(long, short, env = "PAYSTREAM_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    /// One pass, then exit (prints what it did as JSON).
    #[arg(long)]
    once: bool,
    /// Settle every pending claim now, whatever it is worth.
    #[arg(long)]
    force: bool,
    #[command(subcommand)]
    action: Option<SettleAction>,
}

#[derive(Debug, Subcommand)]
enum SettleAction {
    /// What is pending, per payee and token (JSON): count, value, oldest age, due, in flight.
    Status,
}

fn settler_key() -> anyhow::Result<PrivateKeySigner> {
    let text = std::env::var(SETTLER_KEY_ENV)
        .or_else(|_| std::env::var(PAYEE_KEY_ENV))
        .map_err(|_| {
            anyhow::anyhow!(
                "set {SETTLER_KEY_ENV} (the payee's or its operator's key) or {PAYEE_KEY_ENV}"
            )
        })?;
    text.trim()
        .parse()
        .context("the settler key is not a 32-byte hex private key")
}

/// Runs `paystream settle`.
pub async fn run(args: SettleArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--config FILE (or PAYSTREAM_CONFIG) is required"))?;
    let config = load_config(&path)?;
    match config.store.kind.as_str() {
        "memory" => run_with(args, config, MemoryStore::new()).await,
        _ => {
            let store = RedisStore::connect(&config.store.redis_url, &config.store.prefix)
                .await
                .with_context(|| format!("connecting to Redis at {}", config.store.redis_url))?;
            run_with(args, config, store).await
        }
    }
}

async fn run_with<S: ChannelStore + SettlementStore>(
    args: SettleArgs,
    config: paystream::config::ServeConfig,
    store: S,
) -> anyhow::Result<()> {
    let key = settler_key()?;
    let sender = key.address();
    let backend = RpcBackend::connect(&config.chain.rpc_url, key.clone())
        .await
        .with_context(|| format!("connecting to {}", config.chain.rpc_url))?;
    let mut settle = config.settle.config();
    settle.economics.force = args.force;
    let mut settler = Settler::new(Channels::at(backend, config.chain.contract), store, settle);
    // Only the payee's own key signs `Close`.
    if config.chain.payee.is_none_or(|payee| payee == sender) {
        settler = settler.with_close_key(SigningKey::from_slice(key.to_bytes().as_slice())?);
    }
    if let Some(SettleAction::Status) = args.action {
        let status = settler.status().await?;
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    if args.once {
        let pass = settler.run_once().await?;
        println!(
            "{}",
            serde_json::json!({
                "submitted": pass.submitted,
                "settled": pass.settled,
                "skipped": pass.skipped,
                "resent": pass.resent,
                "dropped": pass.dropped,
                "confirming": pass.confirming,
                "due": pass.due,
                "waiting": pass.waiting,
                "closes": pass.closes,
            })
        );
        return Ok(());
    }
    if let Some(listen) = config.settle.metrics_listen {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tokio::spawn(serve_metrics(listener, settler.metrics()));
        info!(%listen, "settler metrics");
    }
    info!(%sender, contract = %config.chain.contract, "paystream settle");
    settler.run(shutdown_signal()).await;
    Ok(())
}

/// `/metrics` (the settler's counters) and `/healthz`, over plain HTTP/1.1.
async fn serve_metrics(listener: TcpListener, metrics: Arc<SettleMetrics>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("metrics accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let metrics = metrics.clone();
                async move {
                    let body = match req.uri().path() {
                        "/metrics" => metrics.render(),
                        _ => "{\"status\":\"ok\"}".to_string(),
                    };
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
