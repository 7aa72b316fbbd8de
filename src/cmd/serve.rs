//! `paystream serve --config FILE`: the engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use clap::Args;
use k256::ecdsa::SigningKey;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, Channels};
use paystream::channel::ChannelDomain;
use paystream::config::{ResourceSection, ServeConfig};
use paystream::server::openai::OpenAiUpstream;
use paystream::server::resource::{Resource, Resources, TokenGenerator};
use paystream::server::{self, ServerState};
use paystream::session::SessionParams;
use paystream::store::ChannelStore;
use paystream::store::memory::MemoryStore;
use paystream::store::redis::RedisStore;
use tokio::net::TcpListener;
use tracing::info;

/// Environment variable holding the payee's private key.
pub const PAYEE_KEY_ENV: &str = "PAYSTREAM_PAYEE_KEY";
/// Environment variable holding the resume tokens' secret (32 bytes or more; the same on every
/// process sharing one Redis).
pub const JWT_SECRET_ENV: &str = "PAYSTREAM_JWT_SECRET";

/// Flags of `paystream serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML configuration file (see the README).
    #[arg(long, short, env = "PAYSTREAM_CONFIG")]
    config: std::path::PathBuf,
}

/// The resources of the configuration.
pub fn resources(config: &ServeConfig) -> Resources {
    let mut out: Resources = BTreeMap::new();
    for (name, section) in &config.resources {
        let resource: Arc<dyn Resource> = match section {
            ResourceSection::TokenGenerator {
                tokens_per_sec,
                max_tokens,
            } => Arc::new(TokenGenerator {
                tokens_per_sec: *tokens_per_sec,
                default_max_tokens: *max_tokens,
            }),
            ResourceSection::Openai {
                base_url,
                model,
                api_key_env,
                timeout_ms,
            } => Arc::new(OpenAiUpstream {
                base_url: base_url.clone(),
                model: model.clone(),
                api_key: api_key_env.as_ref().and_then(|v| std::env::var(v).ok()),
                timeout: std::time::Duration::from_millis(*timeout_ms),
            }),
        };
        out.insert(name.clone(), resource);
    }
    out
}

/// Session parameters from the configuration.
pub fn session_params(
    config: &ServeConfig,
    chain_id: u64,
    payee: alloy::primitives::Address,
) -> SessionParams {
    let s = &config.session;
    SessionParams {
        domain: ChannelDomain::new(chain_id, config.chain.contract),
        payee,
        token: config.chain.token,
        tariff: config.tariff,
        meter: s.meter(),
        min_deposit: s.min_deposit,
        heartbeat_ms: s.heartbeat_ms,
        usage_interval_ms: s.usage_interval_ms,
        voucher_deadline_ms: s.voucher_deadline_ms,
        max_vouchers_per_sec: s.max_vouchers_per_sec,
        min_withdraw_delay_secs: s.min_withdraw_delay_secs,
        max_requests_per_sec: s.max_requests_per_sec,
        replace_requests: s.replace_requests,
    }
}

async fn serve_with<S: ChannelStore>(
    config: ServeConfig,
    store: S,
    key: PrivateKeySigner,
) -> anyhow::Result<()> {
    let payee_key = SigningKey::from_slice(key.to_bytes().as_slice())?;
    let backend = RpcBackend::connect(&config.chain.rpc_url, key)
        .await
        .with_context(|| format!("connecting to {}", config.chain.rpc_url))?;
    let payee = backend.sender();
    let chain_id = backend.chain_id();
    let chain = Channels::at(backend, config.chain.contract);
    let params = session_params(&config, chain_id, payee);
    let mut state = ServerState::new(
        params,
        chain,
        store,
        resources(&config),
        payee_key,
        config.public_url(),
    );
    state.limits = config.limits.limits();
    match std::env::var(JWT_SECRET_ENV) {
        Ok(secret) if secret.len() >= 32 => {
            state.set_resume(secret.as_bytes(), config.session.resume_window_secs)
        }
        Ok(secret) if !secret.is_empty() => {
            anyhow::bail!("{JWT_SECRET_ENV} must be at least 32 bytes")
        }
        // No default secret: a random one per process (resume tokens do not survive a restart).
        _ => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).context("reading OS randomness")?;
            state.set_resume(&secret, config.session.resume_window_secs);
        }
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    info!(%payee, chain_id, contract = %config.chain.contract, "paystream serve");
    server::run(listener, Arc::new(state), shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config = ServeConfig::from_toml(&text)?;
    config.apply_env(|k| std::env::var(k).ok())?;
    config.validate()?;
    let key: PrivateKeySigner = std::env::var(PAYEE_KEY_ENV)
        .with_context(|| format!("set {PAYEE_KEY_ENV} to the payee's private key"))?
        .trim()
        .parse()
        .context("the payee key is not a 32-byte hex private key")?;
    match config.store.kind.as_str() {
        "memory" => serve_with(config, MemoryStore::new(), key).await,
        _ => {
            let store = RedisStore::connect(&config.store.redis_url, &config.store.prefix)
                .await
                .with_context(|| format!("connecting to Redis at {}", config.store.redis_url))?;
            serve_with(config, store, key).await
        }
    }
}
