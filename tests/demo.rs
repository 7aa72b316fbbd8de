//! `paystream demo` runs on embedded defaults with nothing else installed, and shows tokens,
//! the live cost, the settlement and the refund read from the contract.

use std::process::Command;

#[test]
fn the_demo_streams_pays_settles_and_refunds() {
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .expect("paystream demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("PayStream meters every token"),
        "tokens are shown"
    );
    assert!(stdout.contains("cost so far"), "the cost is shown live");
    assert!(
        stdout.contains("voucher #"),
        "vouchers are signed while streaming"
    );
    assert!(
        stdout.contains("receipt   consumed 6 base units, settled 6, refund 99994"),
        "{stdout}"
    );
    assert!(
        stdout.contains("payee received  6 base units"),
        "settlement read from the chain"
    );
    assert!(
        stdout.contains("payer refunded  99994 base units"),
        "refund read from the chain"
    );
}
