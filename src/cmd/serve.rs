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
use paystream::settle::Settler;
use paystream::store::memory::MemoryStore;
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, SettlementStore};
use tracing::info;

/// Environment variable holding the payee's private key.
pub const PAYEE_KEY_ENV: &str = "PAYSTREAM_PAYEE_KEY";
/// Environment variable holding the resume tokens' secret (32 bytes or more; the same on every
/// process sharing one Redis).
pub const JWT_SECRET_ENV: &str = "PAYSTREAM_JWT_SECRET";
/// Environment variable naming a file that holds the resume tokens' secret (a mounted secret);
/// used when `PAYSTREAM_JWT_SECRET` is not set. Surrounding whitespace is ignored.
pub const JWT_SECRET_FILE_ENV: &str = "PAYSTREAM_JWT_SECRET_FILE";

/// The resume tokens' secret from the environment or its file, if one is set.
fn jwt_secret() -> anyhow::Result<Option<Vec<u8>>> {
    let secret = match std::env::var(JWT_SECRET_ENV) {
        Ok(secret) if !secret.is_empty() => Some((secret.into_bytes(), JWT_SECRET_ENV.to_string())),
        _ => match std::env::var_os(JWT_SECRET_FILE_ENV) {
            Some(path) if !path.is_empty() => {
                let text = std::fs::read(&path).with_context(|| {
                    format!(
                        "reading {JWT_SECRET_FILE_ENV} ({})",
                        std::path::Path::new(&path).display()
                    )
                })?;
                let trimmed = text.trim_ascii().to_vec();
                Some((trimmed, JWT_SECRET_FILE_ENV.to_string()))
            }
            _ => None,
        },
    };
    match secret {
        Some((secret, from)) if secret.len() < 32 => {
            anyhow::bail!("{from}: the resume token secret must be at least 32 bytes")
        }
        Some((secret, _)) => Ok(Some(secret)),
        None => Ok(None),
    }
}

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
        claim_interval_ms: s.claim_interval_ms,
    }
}

async fn serve_with<S: ChannelStore + SettlementStore + Clone>(
    config: ServeConfig,
    store: S,
    key: Option<PrivateKeySigner>,
    secret: Vec<u8>,
) -> anyhow::Result<()> {
    // Without the payee's key (a separate settler holds it), the chain is only read: a throwaway
    // key stands in for the sender, and nothing is ever sent from it.
    let signer = key.clone().unwrap_or_else(PrivateKeySigner::random);
    let backend = RpcBackend::connect(&config.chain.rpc_url, signer)
        .await
        .with_context(|| format!("connecting to {}", config.chain.rpc_url))?;
    let payee = match (&key, config.chain.payee) {
        (Some(key), Some(payee)) if payee != key.address() => {
            anyhow::bail!(
                "chain.payee is {payee}, but {PAYEE_KEY_ENV} is the key of {}",
                key.address()
            )
        }
        (Some(key), _) => key.address(),
        (None, Some(payee)) => payee,
        (None, None) => anyhow::bail!("set chain.payee (serve holds no key)"),
    };
    let chain_id = backend.chain_id();
    let chain = Channels::at(backend.clone(), config.chain.contract);
    let params = session_params(&config, chain_id, payee);
    let payee_key = key
        .as_ref()
        .map(|k| SigningKey::from_slice(k.to_bytes().as_slice()))
        .transpose()?;
    let mut state = ServerState::new(
        params,
        chain.clone(),
        store.clone(),
        resources(&config),
        payee_key.clone(),
        config.public_url(),
    );
    state.limits = config.limits.limits();
    state.set_resume(&secret, config.session.resume_window_secs);
    // The in-process settler: the payee's key is in this process; it shares the send lock with
    // the server's cooperative closes.
    let (settler_stop, settler_task) = match &payee_key {
        Some(key) => {
            let settler = Settler::new(chain, store, config.settle.config())
                .with_close_key(key.clone())
                .with_send_lock(state.send_lock.clone());
            state.settle_metrics = Some(settler.metrics());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(settler.run(async move {
                let _ = stopped.await;
            }));
            info!("settling in this process");
            (Some(stop), Some(task))
        }
        None => {
            info!("no key here: run `paystream settle` beside this server on the same store");
            (None, None)
        }
    };
    let listener =
        server::listen(config.listen).with_context(|| format!("binding {}", config.listen))?;
    info!(%payee, chain_id, contract = %config.chain.contract, "paystream serve");
    server::run(listener, Arc::new(state), shutdown_signal()).await?;
    // The sessions' last claims are queued: the settler stops after them.
    if let (Some(stop), Some(task)) = (settler_stop, settler_task) {
        let _ = stop.send(());
        let _ = task.await;
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
    let config = load_config(&args.config)?;
    let secret = match jwt_secret()? {
        Some(secret) => secret,
        // The memory store dies with the process, and its sessions with it: a random secret.
        None if config.store.kind == "memory" => {
            let mut secret = vec![0u8; 32];
            getrandom::fill(&mut secret).context("reading OS randomness")?;
            secret
        }
        None => anyhow::bail!(
            "set {JWT_SECRET_ENV} (or {JWT_SECRET_FILE_ENV}, a file holding it) to a secret of 32 bytes or more, the same for every process on this store: resume tokens are signed with it, and a process that made one up would refuse every token after a restart"
        ),
    };
    let key = if config.settle.in_process() {
        Some(payee_key_from_env().with_context(|| {
            format!(
                "set {PAYEE_KEY_ENV} to the payee's private key (or run a separate settler: [settle] mode = \"separate\")"
            )
        })?)
    } else {
        if std::env::var_os(PAYEE_KEY_ENV).is_some() {
            tracing::warn!("{PAYEE_KEY_ENV} is set but ignored: [settle] mode is \"separate\"");
        }
        None
    };
    match config.store.kind.as_str() {
        "memory" => serve_with(config, MemoryStore::new(), key, secret).await,
        "redis_cluster" => {
            let nodes: Vec<String> = config
                .store
                .redis_url
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            let store = RedisStore::connect_cluster(&nodes, &config.store.prefix)
                .await
                .with_context(|| {
                    format!(
                        "connecting to the Redis Cluster at {}",
                        config.store.redis_url
                    )
                })?;
            serve_with(config, store, key, secret).await
        }
        _ => {
            let store = RedisStore::connect(&config.store.redis_url, &config.store.prefix)
                .await
                .with_context(|| format!("connecting to Redis at {}", config.store.redis_url))?;
            serve_with(config, store, key, secret).await
        }
    }
}

/// The configuration file, with the environment applied, validated.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<ServeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = ServeConfig::from_toml(&text)?;
    config.apply_env(|k| std::env::var(k).ok())?;
    config.validate()?;
    Ok(config)
}

/// The payee's key from `PAYSTREAM_PAYEE_KEY`.
pub fn payee_key_from_env() -> anyhow::Result<PrivateKeySigner> {
    std::env::var(PAYEE_KEY_ENV)
        .map_err(|_| anyhow::anyhow!("{PAYEE_KEY_ENV} is not set"))?
        .trim()
        .parse()
        .context("the payee key is not a 32-byte hex private key")
}
