// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity ^0.8.28;

import {TestBase, Vm} from "./Vm.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {MockERC20} from "./Mocks.sol";

/// @dev A deployed contract, a payer, a payee and a token, with signing helpers.
abstract contract ChannelsBase is TestBase {
    PaymentChannels internal pc;
    MockERC20 internal usd;

    uint256 internal constant PAYER_KEY = 0xA11CE;
    uint256 internal constant PAYEE_KEY = 0xB0B;
    uint256 internal constant OTHER_KEY = 0xE7E;
    address internal payer;
    address internal payee;
    address internal other;
    uint32 internal constant DELAY = 1 hours;

    function setUp() public virtual {
        pc = new PaymentChannels();
        usd = new MockERC20();
        payer = vm.addr(PAYER_KEY);
        payee = vm.addr(PAYEE_KEY);
        other = vm.addr(OTHER_KEY);
        vm.deal(payer, 1_000 ether);
        vm.deal(other, 1_000 ether);
        usd.mint(payer, 1e30);
        vm.prank(payer);
        usd.approve(address(pc), type(uint256).max);
    }

    function openNative(bytes32 salt, uint128 amount) internal returns (bytes32 id) {
        vm.prank(payer);
        id = pc.open{value: amount}(payee, address(0), salt, amount, DELAY);
    }

    function openToken(bytes32 salt, uint128 amount) internal returns (bytes32 id) {
        vm.prank(payer);
        id = pc.open(payee, address(usd), salt, amount, DELAY);
    }

    function signState(uint256 key, bytes32 id, uint64 nonce, uint128 cumulative)
        internal
        view
        returns (bytes32 r, bytes32 vs)
    {
        (uint8 v, bytes32 r_, bytes32 s) = vm.sign(key, pc.stateDigest(id, nonce, cumulative));
        r = r_;
        vs = bytes32(uint256(s) | (uint256(v - 27) << 255));
    }

    function claimOf(uint256 key, bytes32 id, uint64 nonce, uint128 cumulative, uint128 amount)
        internal
        view
        returns (PaymentChannels.Claim memory c)
    {
        (bytes32 r, bytes32 vs) = signState(key, id, nonce, cumulative);
        c = PaymentChannels.Claim({channelId: id, nonce: nonce, cumulative: cumulative, amount: amount, r: r, vs: vs});
    }

    function one(PaymentChannels.Claim memory c) internal pure returns (PaymentChannels.Claim[] memory cs) {
        cs = new PaymentChannels.Claim[](1);
        cs[0] = c;
    }

    function settleAs(address who, PaymentChannels.Claim[] memory cs) internal {
        vm.prank(who);
        pc.settle(cs);
    }

    function closeSig(uint256 key, bytes32 id, uint128 amount) internal view returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, pc.closeDigest(id, amount));
        return abi.encodePacked(r, s, v);
    }

    /// The skip reasons emitted by the last recorded logs, in order.
    function skipReasons() internal returns (uint8[] memory reasons) {
        Vm.Log[] memory logs = vm.getRecordedLogs();
        bytes32 topic = PaymentChannels.ClaimSkipped.selector;
        uint256 n;
        for (uint256 i; i < logs.length; ++i) if (logs[i].topics[0] == topic) ++n;
        reasons = new uint8[](n);
        n = 0;
        for (uint256 i; i < logs.length; ++i) {
            if (logs[i].topics[0] == topic) {
                (, uint8 reason) = abi.decode(logs[i].data, (uint256, uint8));
                reasons[n++] = reason;
            }
        }
    }

    function claimed(bytes32 id) internal view returns (uint256) {
        return pc.getChannel(id).claimed;
    }
}
