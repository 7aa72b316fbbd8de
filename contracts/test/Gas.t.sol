// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity ^0.8.28;

import {ChannelsBase} from "./Base.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";

/// @dev Gas of `settle` by batch size, inside forge (the published figures come from anvil
/// receipts, scripts/gas). Run with `forge test --match-contract GasTest -vv`.
contract GasTest is ChannelsBase {
    event log_named_uint(string key, uint256 val);

    uint256 internal salt;

    function batch(uint256 n, bool native) internal returns (PaymentChannels.Claim[] memory cs) {
        cs = new PaymentChannels.Claim[](n);
        for (uint256 i; i < n; ++i) {
            bytes32 id = native ? openNative(bytes32(++salt), 1e18) : openToken(bytes32(++salt), 1e18);
            cs[i] = claimOf(PAYER_KEY, id, uint64(1000 + i), uint128(5e17 + i), uint128(4e17 + i));
        }
    }

    function measure(uint256 n, bool native) internal returns (uint256 used) {
        PaymentChannels.Claim[] memory cs = batch(n, native);
        vm.prank(payee);
        uint256 before = gasleft();
        pc.settle(cs);
        used = before - gasleft();
    }

    function test_gas_settle_batches() public {
        uint256 g1 = measure(1, false);
        uint256 g10 = measure(10, false);
        uint256 g100 = measure(100, false);
        emit log_named_uint("settle 1 (erc20, execution only)", g1);
        emit log_named_uint("settle 10", g10);
        emit log_named_uint("settle 100", g100);
        emit log_named_uint("marginal per claim, 10 -> 100", (g100 - g10) / 90);
    }
}
