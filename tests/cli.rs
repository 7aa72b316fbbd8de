//! `paystream state digest|sign|verify|channel-id`, run as a process.

mod common;

use common::vectors::{Case, load};
use serde_json::Value;
use std::process::{Command, Output};

fn paystream(args: &[&str], key: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paystream"));
    cmd.args(args).env_remove("PAYSTREAM_PAYER_KEY");
    if let Some(key) = key {
        cmd.env("PAYSTREAM_PAYER_KEY", key);
    }
    cmd.output().expect("paystream runs")
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON object ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn state_flags(case: &Case) -> Vec<String> {
    vec![
        "--chain-id".into(),
        case.chain_id.to_string(),
        "--contract".into(),
        case.verifying_contract.to_string(),
        "--channel-id".into(),
        case.channel_id.to_string(),
        "--nonce".into(),
        case.nonce.to_string(),
        "--cumulative".into(),
        case.cumulative.to_string(),
    ]
}

fn run(sub: &str, case: &Case, extra: &[&str], key: Option<&str>) -> Output {
    let flags = state_flags(case);
    let mut args: Vec<&str> = vec!["state", sub];
    args.extend(flags.iter().map(String::as_str));
    args.extend_from_slice(extra);
    paystream(&args, key)
}

fn lower(v: &Value) -> String {
    v.as_str().unwrap().to_lowercase()
}

#[test]
fn digest_matches_the_vectors() {
    for case in load().cases {
        let out = run("digest", &case, &[], None);
        assert!(out.status.success());
        let v = json(&out);
        assert_eq!(
            lower(&v["domainSeparator"]),
            case.domain_separator.to_string()
        );
        assert_eq!(lower(&v["structHash"]), case.struct_hash.to_string());
        assert_eq!(lower(&v["digest"]), case.digest.to_string());
    }
}

#[test]
fn sign_then_verify_round_trips() {
    let case = &load().cases[2];
    let key = case.private_key.to_string();
    let signed = run("sign", case, &[], Some(&key));
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let signed = json(&signed);
    let sig = signed["signature"].as_str().unwrap();
    assert_eq!(
        sig,
        case.signature.to_string(),
        "RFC 6979 reproduces the vector"
    );
    assert_eq!(
        lower(&signed["payer"]),
        case.payer.to_string().to_lowercase()
    );
    assert_eq!(lower(&signed["compact"]["vs"]), case.compact.vs.to_string());

    let verified = run("verify", case, &["--signature", sig], None);
    assert!(verified.status.success());
    let verified = json(&verified);
    assert_eq!(verified["valid"], true);
    assert_eq!(
        lower(&verified["payer"]),
        case.payer.to_string().to_lowercase()
    );

    // The compact form verifies too, against the known payer.
    let compact = format!("{}{}", case.compact.r, &case.compact.vs.to_string()[2..]);
    let payer = case.payer.to_string();
    let out = run(
        "verify",
        case,
        &["--signature", &compact, "--payer", &payer],
        None,
    );
    assert!(out.status.success());
}

#[test]
fn verify_prints_each_vectors_payer() {
    for case in load().cases {
        let sig = case.signature.to_string();
        let out = run("verify", &case, &["--signature", &sig], None);
        assert!(out.status.success());
        assert_eq!(
            lower(&json(&out)["payer"]),
            case.payer.to_string().to_lowercase()
        );
    }
}

#[test]
fn verify_fails_loudly_on_bad_signatures() {
    let case = &load().cases[1];
    let high_s = case.high_s_signature.to_string();
    let out = run("verify", case, &["--signature", &high_s], None);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["valid"], false);
    assert_eq!(v["error"], "invalid_signature");
    assert!(String::from_utf8_lossy(&out.stderr).contains("high s"));

    // The right signature checked against another payer.
    let sig = case.signature.to_string();
    let other = case.payee.to_string();
    let out = run(
        "verify",
        case,
        &["--signature", &sig, "--payer", &other],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));

    // A tampered field: the signature recovers someone else, so with --payer it fails.
    let mut tampered = case.clone();
    tampered.nonce -= 1;
    let payer = case.payer.to_string();
    let out = run(
        "verify",
        &tampered,
        &["--signature", &sig, "--payer", &payer],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn sign_without_a_key_is_a_usage_error() {
    let case = &load().cases[0];
    let out = run("sign", case, &[], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key"));
    let out = run("sign", case, &[], Some("0x1234"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 bytes"));
}

#[test]
fn channel_id_matches_the_vectors() {
    for case in load().cases {
        let args = [
            "state".to_string(),
            "channel-id".into(),
            "--chain-id".into(),
            case.chain_id.to_string(),
            "--contract".into(),
            case.verifying_contract.to_string(),
            "--payer".into(),
            case.payer.to_string(),
            "--payee".into(),
            case.payee.to_string(),
            "--token".into(),
            case.token.to_string(),
            "--salt".into(),
            case.salt.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = paystream(&args, None);
        assert!(out.status.success());
        assert_eq!(lower(&json(&out)["channelId"]), case.channel_id.to_string());
    }
}
