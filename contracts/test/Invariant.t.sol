// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity ^0.8.28;

import {TestBase} from "./Vm.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {MockERC20} from "./Mocks.sol";

/// @dev Drives random opens, top-ups, claims, withdrawals and cooperative closes over a few
/// payers, in native ETH and one ERC-20, and keeps the ledger the invariant checks against.
contract Handler is TestBase {
    PaymentChannels public immutable pc;
    MockERC20 public immutable usd;
    address public immutable payee;
    uint256 internal constant PAYEE_KEY = 0xB0B;

    bytes32[] public ids;
    mapping(bytes32 => uint256) public keyOf;
    mapping(bytes32 => uint64) public nextNonce;
    /// token (0 = native) => deposited, claimed, withdrawn (refunds included)
    mapping(address => uint256) public deposited;
    mapping(address => uint256) public paidOut;
    uint256 internal saltCounter;

    constructor(PaymentChannels pc_, MockERC20 usd_) {
        pc = pc_;
        usd = usd_;
        payee = vm.addr(PAYEE_KEY);
    }

    function idsLength() external view returns (uint256) {
        return ids.length;
    }

    function open(uint256 payerSeed, bool native, uint96 amount) external {
        uint256 key = 1 + (payerSeed % 3);
        address payer = vm.addr(key);
        amount = uint96(bound(amount, 1, 1e24));
        address token = native ? address(0) : address(usd);
        vm.deal(payer, amount);
        usd.mint(payer, amount);
        vm.prank(payer);
        usd.approve(address(pc), amount);
        vm.prank(payer);
        bytes32 id = pc.open{value: native ? amount : 0}(payee, token, bytes32(++saltCounter), amount, 1 hours);
        ids.push(id);
        keyOf[id] = key;
        deposited[token] += amount;
    }

    function topUp(uint256 which, uint96 amount) external {
        if (ids.length == 0) return;
        bytes32 id = ids[which % ids.length];
        PaymentChannels.ChannelView memory ch = pc.getChannel(id);
        if (ch.closed || ch.withdrawAt != 0) return;
        amount = uint96(bound(amount, 1, 1e24));
        if (uint256(ch.deposit) + amount > type(uint96).max) return;
        vm.deal(ch.payer, amount);
        usd.mint(ch.payer, amount);
        vm.prank(ch.payer);
        usd.approve(address(pc), amount);
        vm.prank(ch.payer);
        pc.topUp{value: ch.token == address(0) ? amount : 0}(id, amount);
        deposited[ch.token] += amount;
    }

    function claim(uint256 which, uint128 amount, bool forged) external {
        if (ids.length == 0) return;
        bytes32 id = ids[which % ids.length];
        PaymentChannels.ChannelView memory before = pc.getChannel(id);
        amount = uint128(bound(amount, 0, uint256(before.deposit) + 10));
        uint64 nonce = ++nextNonce[id];
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(forged ? 0xF0F0 : keyOf[id], pc.stateDigest(id, nonce, amount));
        PaymentChannels.Claim[] memory cs = new PaymentChannels.Claim[](1);
        cs[0] = PaymentChannels.Claim(id, nonce, amount, amount, r, bytes32(uint256(s) | (uint256(v - 27) << 255)));
        vm.prank(payee);
        pc.settle(cs);
        PaymentChannels.ChannelView memory afterwards = pc.getChannel(id);
        paidOut[before.token] += afterwards.claimed - before.claimed;
    }

    function withdraw(uint256 which, uint32 wait) external {
        if (ids.length == 0) return;
        bytes32 id = ids[which % ids.length];
        PaymentChannels.ChannelView memory ch = pc.getChannel(id);
        if (ch.closed) return;
        if (ch.withdrawAt == 0) {
            vm.prank(ch.payer);
            pc.requestWithdraw(id);
            return;
        }
        vm.warp(block.timestamp + bound(wait, 0, 2 hours));
        if (block.timestamp < pc.getChannel(id).withdrawAt) return;
        vm.prank(ch.payer);
        pc.withdraw(id);
        paidOut[ch.token] += ch.deposit - ch.claimed;
    }

    function closeCooperatively(uint256 which, uint128 amount) external {
        if (ids.length == 0) return;
        bytes32 id = ids[which % ids.length];
        PaymentChannels.ChannelView memory ch = pc.getChannel(id);
        if (ch.closed) return;
        amount = uint128(bound(amount, ch.claimed, ch.deposit));
        PaymentChannels.Claim memory c = _signed(id, amount);
        bytes memory payeeSig = _closeSig(id, amount);
        pc.closeCooperative(c, payeeSig);
        paidOut[ch.token] += ch.deposit - ch.claimed;
    }

    function _signed(bytes32 id, uint128 amount) internal returns (PaymentChannels.Claim memory) {
        uint64 nonce = ++nextNonce[id];
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(keyOf[id], pc.stateDigest(id, nonce, amount));
        return PaymentChannels.Claim(id, nonce, amount, amount, r, bytes32(uint256(s) | (uint256(v - 27) << 255)));
    }

    function _closeSig(bytes32 id, uint128 amount) internal view returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(PAYEE_KEY, pc.closeDigest(id, amount));
        return abi.encodePacked(r, s, v);
    }
}

/// @dev The contract's balance of each token always equals deposits minus claimed minus
/// withdrawn, and each open channel's claimed never exceeds its deposit.
contract InvariantTest is TestBase {
    PaymentChannels internal pc;
    MockERC20 internal usd;
    Handler internal handler;

    function setUp() public {
        pc = new PaymentChannels();
        usd = new MockERC20();
        handler = new Handler(pc, usd);
    }

    function targetContracts() public view returns (address[] memory targets) {
        targets = new address[](1);
        targets[0] = address(handler);
    }

    function invariant_balances_equal_deposits_minus_paid_out() public view {
        assertEq(address(pc).balance, handler.deposited(address(0)) - handler.paidOut(address(0)), "native");
        assertEq(usd.balanceOf(address(pc)), handler.deposited(address(usd)) - handler.paidOut(address(usd)), "usd");
    }

    function invariant_claimed_within_deposit() public view {
        uint256 n = handler.idsLength();
        for (uint256 i; i < n; ++i) {
            PaymentChannels.ChannelView memory ch = pc.getChannel(handler.ids(i));
            assertTrue(ch.claimed <= ch.deposit, "claimed <= deposit");
        }
    }
}
