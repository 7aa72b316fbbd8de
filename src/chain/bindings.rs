//! Bindings generated from the committed artifact (`contracts/out/PaymentChannels.sol/
//! PaymentChannels.json`): the ABI, the events, the custom errors and the bytecode.

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    #[allow(missing_docs)]
    PaymentChannels,
    "contracts/out/PaymentChannels.sol/PaymentChannels.json"
);

/// Makes Cargo rebuild the bindings when the committed artifact changes.
const _ARTIFACT: &[u8] =
    include_bytes!("../../contracts/out/PaymentChannels.sol/PaymentChannels.json");
