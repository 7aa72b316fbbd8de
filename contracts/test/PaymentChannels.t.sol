// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity ^0.8.28;

import {ChannelsBase} from "./Base.sol";
import {Vm} from "./Vm.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {MockERC20, NoReturnToken, FalseToken, FeeToken, ReentrantToken, RejectingReceiver} from "./Mocks.sol";

contract OpenTest is ChannelsBase {
    function test_open_native() public {
        bytes32 id = openNative("a", 1 ether);
        assertEq(id, pc.channelIdOf(payer, payee, address(0), "a"), "channel id");
        PaymentChannels.ChannelView memory ch = pc.getChannel(id);
        assertEq(ch.payer, payer, "payer");
        assertEq(ch.payee, payee, "payee");
        assertEq(ch.token, address(0), "token");
        assertEq(ch.deposit, 1 ether, "deposit");
        assertEq(ch.withdrawDelay, DELAY, "delay");
        assertEq(address(pc).balance, 1 ether, "contract balance");
    }

    function test_open_erc20() public {
        bytes32 id = openToken("a", 5_000_000);
        assertEq(usd.balanceOf(address(pc)), 5_000_000, "contract balance");
        assertEq(pc.getChannel(id).deposit, 5_000_000, "deposit");
    }

    function test_open_token_without_return_value() public {
        NoReturnToken t = new NoReturnToken();
        t.mint(payer, 100);
        vm.startPrank(payer);
        t.approve(address(pc), 100);
        bytes32 id = pc.open(payee, address(t), "n", 100, DELAY);
        vm.stopPrank();
        assertEq(t.balanceOf(address(pc)), 100, "pulled");
        // And it pays out through the same no-return path.
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 1, 60, 60);
        settleAs(payee, one(c));
        assertEq(t.balanceOf(payee), 60, "paid");
    }

    function test_open_rejects_false_returning_token() public {
        FalseToken t = new FalseToken();
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.TokenTransferFailed.selector, address(t)));
        pc.open(payee, address(t), "f", 100, DELAY);
    }

    function test_open_rejects_fee_on_transfer_token() public {
        FeeToken t = new FeeToken();
        t.mint(payer, 1000);
        vm.startPrank(payer);
        t.approve(address(pc), 1000);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.TokenTransferFailed.selector, address(t)));
        pc.open(payee, address(t), "f", 1000, DELAY);
        vm.stopPrank();
    }

    function test_open_rejects_bad_arguments() public {
        vm.startPrank(payer);
        vm.expectRevert(PaymentChannels.ZeroPayee.selector);
        pc.open{value: 1}(address(0), address(0), "x", 1, DELAY);
        vm.expectRevert(PaymentChannels.ZeroAmount.selector);
        pc.open(payee, address(0), "x", 0, DELAY);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WithdrawDelayOutOfRange.selector, uint32(15 minutes - 1)));
        pc.open{value: 1}(payee, address(0), "x", 1, 15 minutes - 1);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WithdrawDelayOutOfRange.selector, uint32(30 days + 1)));
        pc.open{value: 1}(payee, address(0), "x", 1, 30 days + 1);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WrongValue.selector, 2, 1));
        pc.open{value: 1}(payee, address(0), "x", 2, DELAY);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WrongValue.selector, 0, 1));
        pc.open{value: 1}(payee, address(usd), "x", 2, DELAY);
        uint128 tooMuch = uint128(type(uint96).max) + 1;
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.DepositTooLarge.selector, uint256(tooMuch)));
        pc.open(payee, address(usd), "x", tooMuch, DELAY);
        vm.stopPrank();
        // Both delay bounds themselves are allowed.
        vm.prank(payer);
        pc.open{value: 1}(payee, address(0), "lo", 1, 15 minutes);
        vm.prank(payer);
        pc.open{value: 1}(payee, address(0), "hi", 1, 30 days);
    }

    function test_open_twice_reverts() public {
        bytes32 id = openNative("a", 1);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.ChannelExists.selector, id));
        pc.open{value: 1}(payee, address(0), "a", 1, DELAY);
    }

    function test_top_up() public {
        bytes32 id = openNative("a", 1 ether);
        vm.prank(other);
        pc.topUp{value: 2 ether}(id, 2 ether);
        assertEq(pc.getChannel(id).deposit, 3 ether, "deposit");
        bytes32 tid = openToken("t", 100);
        vm.prank(payer);
        pc.topUp(tid, 50);
        assertEq(pc.getChannel(tid).deposit, 150, "token deposit");
        assertEq(usd.balanceOf(address(pc)), 150, "token balance");
    }

    function test_top_up_rejections() public {
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.UnknownChannel.selector, bytes32("nope")));
        pc.topUp{value: 1}(bytes32("nope"), 1);
        bytes32 id = openNative("a", 1 ether);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WrongValue.selector, 2, 1));
        pc.topUp{value: 1}(id, 2);
        vm.expectRevert(PaymentChannels.ZeroAmount.selector);
        pc.topUp(id, 0);
        vm.prank(payer);
        pc.requestWithdraw(id);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.ChannelClosing.selector, id));
        pc.topUp{value: 1}(id, 1);
        vm.warp(block.timestamp + DELAY);
        vm.prank(payer);
        pc.withdraw(id);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.ChannelClosed.selector, id));
        pc.topUp{value: 1}(id, 1);
    }
}

contract SettleTest is ChannelsBase {
    function test_settle_pays_the_difference() public {
        bytes32 id = openToken("a", 1000);
        settleAs(payee, one(claimOf(PAYER_KEY, id, 1, 300, 250)));
        assertEq(usd.balanceOf(payee), 250, "first claim");
        settleAs(payee, one(claimOf(PAYER_KEY, id, 5, 900, 900)));
        assertEq(usd.balanceOf(payee), 900, "second claim pays the difference");
        PaymentChannels.ChannelView memory ch = pc.getChannel(id);
        assertEq(ch.claimed, 900, "claimed");
        assertEq(ch.claimedNonce, 5, "nonce");
        assertEq(usd.balanceOf(address(pc)), 100, "rest stays");
    }

    function test_settle_native() public {
        bytes32 id = openNative("a", 1 ether);
        uint256 before = payee.balance;
        settleAs(payee, one(claimOf(PAYER_KEY, id, 1, 0.5 ether, 0.4 ether)));
        assertEq(payee.balance - before, 0.4 ether, "paid");
        assertEq(address(pc).balance, 0.6 ether, "left");
    }

    function test_resubmission_is_harmless() public {
        bytes32 id = openToken("a", 1000);
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 1, 300, 300);
        settleAs(payee, one(c));
        vm.recordLogs();
        settleAs(payee, one(c));
        uint8[] memory reasons = skipReasons();
        assertEq(reasons.length, 1, "skipped");
        assertEq(reasons[0], pc.SKIP_ALREADY_CLAIMED(), "reason");
        assertEq(usd.balanceOf(payee), 300, "paid once");
    }

    function expectSkip(PaymentChannels.Claim memory c, address caller, uint8 reason) internal {
        uint256 payeeBefore = usd.balanceOf(payee);
        uint256 claimedBefore = claimed(c.channelId);
        vm.recordLogs();
        settleAs(caller, one(c));
        uint8[] memory reasons = skipReasons();
        assertEq(reasons.length, 1, "one skip");
        assertEq(reasons[0], reason, "skip reason");
        assertEq(usd.balanceOf(payee), payeeBefore, "nothing paid");
        assertEq(claimed(c.channelId), claimedBefore, "nothing claimed");
    }

    function test_wrong_signer_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        expectSkip(claimOf(OTHER_KEY, id, 1, 100, 100), payee, pc.SKIP_BAD_SIGNATURE());
    }

    function test_high_s_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 1, 100, 100);
        uint256 n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;
        uint256 s = uint256(c.vs) & ((1 << 255) - 1);
        uint256 parity = uint256(c.vs) >> 255;
        // The twin: s' = n - s, parity flipped. ecrecover alone would accept it.
        c.vs = bytes32((n - s) | ((1 - parity) << 255));
        expectSkip(c, payee, pc.SKIP_BAD_SIGNATURE());
    }

    function test_tampered_fields_are_skipped() public {
        bytes32 id = openToken("a", 1000);
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 2, 100, 100);
        c.nonce = 3;
        expectSkip(c, payee, pc.SKIP_BAD_SIGNATURE());
        c = claimOf(PAYER_KEY, id, 2, 100, 100);
        c.cumulative = 101;
        expectSkip(c, payee, pc.SKIP_BAD_SIGNATURE());
    }

    function test_wrong_caller_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        expectSkip(claimOf(PAYER_KEY, id, 1, 100, 100), other, pc.SKIP_NOT_PAYEE());
    }

    function test_operator_can_claim_and_be_removed() public {
        bytes32 id = openToken("a", 1000);
        vm.prank(payee);
        pc.setOperator(other, true);
        assertTrue(pc.isOperator(payee, other), "registered");
        settleAs(other, one(claimOf(PAYER_KEY, id, 1, 100, 100)));
        assertEq(usd.balanceOf(payee), 100, "paid to the payee, not the operator");
        assertEq(usd.balanceOf(other), 0, "operator holds nothing");
        vm.prank(payee);
        pc.setOperator(other, false);
        expectSkip(claimOf(PAYER_KEY, id, 2, 200, 200), other, pc.SKIP_NOT_PAYEE());
    }

    function test_amount_over_cumulative_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        expectSkip(claimOf(PAYER_KEY, id, 1, 100, 101), payee, pc.SKIP_EXCEEDS_CUMULATIVE());
    }

    function test_amount_over_deposit_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        expectSkip(claimOf(PAYER_KEY, id, 1, 5000, 1001), payee, pc.SKIP_EXCEEDS_DEPOSIT());
    }

    function test_amount_not_above_claimed_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        settleAs(payee, one(claimOf(PAYER_KEY, id, 1, 500, 500)));
        expectSkip(claimOf(PAYER_KEY, id, 2, 600, 500), payee, pc.SKIP_ALREADY_CLAIMED());
        expectSkip(claimOf(PAYER_KEY, id, 2, 600, 400), payee, pc.SKIP_ALREADY_CLAIMED());
    }

    function test_lower_nonce_is_skipped() public {
        bytes32 id = openToken("a", 1000);
        settleAs(payee, one(claimOf(PAYER_KEY, id, 10, 500, 500)));
        expectSkip(claimOf(PAYER_KEY, id, 9, 600, 600), payee, pc.SKIP_STALE_NONCE());
        // The same nonce with a larger amount is allowed (nonce >= last claimed nonce).
        settleAs(payee, one(claimOf(PAYER_KEY, id, 10, 500, 500)));
        settleAs(payee, one(claimOf(PAYER_KEY, id, 10, 700, 600)));
        assertEq(claimed(id), 600, "same nonce, more taken under a new state");
    }

    function test_unknown_and_closed_channels_are_skipped() public {
        expectSkip(claimOf(PAYER_KEY, bytes32("nope"), 1, 1, 1), payee, pc.SKIP_UNKNOWN_CHANNEL());
        bytes32 id = openToken("a", 1000);
        vm.prank(payer);
        pc.requestWithdraw(id);
        vm.warp(block.timestamp + DELAY);
        vm.prank(payer);
        pc.withdraw(id);
        expectSkip(claimOf(PAYER_KEY, id, 1, 1, 1), payee, pc.SKIP_CLOSED());
    }

    function test_batch_mixing_valid_and_invalid_claims() public {
        bytes32 a = openToken("a", 1000);
        bytes32 b = openToken("b", 1000);
        bytes32 c = openToken("c", 1000);
        PaymentChannels.Claim[] memory cs = new PaymentChannels.Claim[](6);
        cs[0] = claimOf(PAYER_KEY, a, 1, 100, 100); // ok
        cs[1] = claimOf(OTHER_KEY, b, 1, 100, 100); // bad signature
        cs[2] = claimOf(PAYER_KEY, b, 1, 200, 200); // ok
        cs[3] = claimOf(PAYER_KEY, c, 1, 50, 60); // over cumulative
        cs[4] = claimOf(PAYER_KEY, a, 1, 100, 100); // already claimed (same batch)
        cs[5] = claimOf(PAYER_KEY, c, 2, 70, 70); // ok
        vm.recordLogs();
        settleAs(payee, cs);
        uint8[] memory reasons = skipReasons();
        assertEq(reasons.length, 3, "three skipped");
        assertEq(reasons[0], pc.SKIP_BAD_SIGNATURE(), "bad signature");
        assertEq(reasons[1], pc.SKIP_EXCEEDS_CUMULATIVE(), "over cumulative");
        assertEq(reasons[2], pc.SKIP_ALREADY_CLAIMED(), "already claimed");
        assertEq(usd.balanceOf(payee), 370, "paid the valid ones");
        assertEq(usd.transferCount(), 1, "one transfer for the run");
        assertEq(claimed(a) + claimed(b) + claimed(c), 370, "claimed");
    }

    function test_settled_event_lists_the_paid_channels_of_each_run() public {
        bytes32 a = openToken("a", 1000);
        bytes32 b = openToken("b", 1000);
        bytes32 n = openNative("n", 1000);
        PaymentChannels.Claim[] memory cs = new PaymentChannels.Claim[](4);
        cs[0] = claimOf(PAYER_KEY, a, 1, 100, 100);
        cs[1] = claimOf(PAYER_KEY, b, 1, 50, 60); // skipped: over cumulative
        cs[2] = claimOf(PAYER_KEY, b, 2, 200, 200);
        cs[3] = claimOf(PAYER_KEY, n, 1, 7, 7);
        vm.recordLogs();
        settleAs(payee, cs);
        Vm.Log[] memory logs = vm.getRecordedLogs();
        uint256 runs;
        for (uint256 i; i < logs.length; ++i) {
            if (logs[i].topics[0] != PaymentChannels.Settled.selector) continue;
            assertEq(address(uint160(uint256(logs[i].topics[1]))), payee, "payee topic");
            (uint256 amount, bytes32[] memory ids) = abi.decode(logs[i].data, (uint256, bytes32[]));
            if (runs == 0) {
                assertEq(address(uint160(uint256(logs[i].topics[2]))), address(usd), "token topic");
                assertEq(amount, 300, "usd run total");
                assertEq(ids.length, 2, "two paid usd claims");
                assertEq(ids[0], a, "first");
                assertEq(ids[1], b, "second");
            } else {
                assertEq(address(uint160(uint256(logs[i].topics[2]))), address(0), "native topic");
                assertEq(amount, 7, "native run total");
                assertEq(ids.length, 1, "one paid native claim");
                assertEq(ids[0], n, "native channel");
            }
            ++runs;
        }
        assertEq(runs, 2, "one Settled per run");
    }

    function test_one_transfer_per_run_of_payee_and_token() public {
        MockERC20 eur = new MockERC20();
        eur.mint(payer, 1e9);
        vm.prank(payer);
        eur.approve(address(pc), type(uint256).max);
        bytes32 u1 = openToken("u1", 1000);
        bytes32 u2 = openToken("u2", 1000);
        vm.prank(payer);
        bytes32 e1 = pc.open(payee, address(eur), "e1", 1000, DELAY);
        vm.prank(payer);
        bytes32 n1 = pc.open{value: 1000}(payee, address(0), "n1", 1000, DELAY);
        PaymentChannels.Claim[] memory cs = new PaymentChannels.Claim[](5);
        cs[0] = claimOf(PAYER_KEY, u1, 1, 10, 10);
        cs[1] = claimOf(PAYER_KEY, u2, 1, 20, 20);
        cs[2] = claimOf(PAYER_KEY, e1, 1, 30, 30);
        cs[3] = claimOf(PAYER_KEY, n1, 1, 40, 40);
        cs[4] = claimOf(PAYER_KEY, u1, 2, 15, 15);
        uint256 ethBefore = payee.balance;
        settleAs(payee, cs);
        assertEq(usd.transferCount(), 2, "usd runs: [u1,u2] and [u1]");
        assertEq(eur.transferCount(), 1, "eur run");
        assertEq(usd.balanceOf(payee), 35, "usd paid");
        assertEq(eur.balanceOf(payee), 30, "eur paid");
        assertEq(payee.balance - ethBefore, 40, "eth paid");
    }

    function test_batch_across_payees_by_a_shared_operator() public {
        address payee2 = vm.addr(0xC0C);
        vm.prank(payer);
        bytes32 a = pc.open(payee, address(usd), "a", 1000, DELAY);
        vm.prank(payer);
        bytes32 b = pc.open(payee2, address(usd), "b", 1000, DELAY);
        vm.prank(payee);
        pc.setOperator(other, true);
        PaymentChannels.Claim[] memory cs = new PaymentChannels.Claim[](2);
        cs[0] = claimOf(PAYER_KEY, a, 1, 10, 10);
        cs[1] = claimOf(PAYER_KEY, b, 1, 20, 20);
        vm.recordLogs();
        settleAs(other, cs);
        uint8[] memory reasons = skipReasons();
        assertEq(reasons.length, 1, "payee2 did not register the operator");
        assertEq(reasons[0], pc.SKIP_NOT_PAYEE(), "reason");
        vm.prank(payee2);
        pc.setOperator(other, true);
        settleAs(other, cs);
        assertEq(usd.balanceOf(payee), 10, "payee");
        assertEq(usd.balanceOf(payee2), 20, "payee2");
    }

    function test_payee_refusing_ether_reverts_its_own_batch() public {
        RejectingReceiver r = new RejectingReceiver();
        vm.prank(payer);
        bytes32 id = pc.open{value: 100}(address(r), address(0), "r", 100, DELAY);
        PaymentChannels.Claim[] memory cs = one(claimOf(PAYER_KEY, id, 1, 10, 10));
        vm.prank(address(r));
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.NativeTransferFailed.selector, address(r)));
        pc.settle(cs);
    }

    function testFuzz_claims_follow_the_rules(uint128 deposit, uint64[4] memory nonces, uint128[4] memory amounts) public {
        deposit = uint128(bound(deposit, 1, type(uint96).max));
        bytes32 id = openToken("fuzz", deposit);
        uint256 lastNonce;
        uint256 lastClaimed;
        for (uint256 i; i < 4; ++i) {
            uint128 amount = uint128(bound(amounts[i], 0, uint256(deposit) + 10));
            uint64 nonce = uint64(bound(nonces[i], 0, 20));
            bool ok = amount <= deposit && amount > lastClaimed && nonce >= lastNonce;
            settleAs(payee, one(claimOf(PAYER_KEY, id, nonce, amount, amount)));
            if (ok) {
                lastClaimed = amount;
                lastNonce = nonce;
            }
            assertEq(claimed(id), lastClaimed, "claimed follows the model");
            assertEq(usd.balanceOf(payee), lastClaimed, "paid equals claimed");
            assertEq(pc.getChannel(id).claimedNonce, lastNonce, "nonce follows the model");
        }
    }
}

contract WithdrawTest is ChannelsBase {
    function test_withdraw_after_delay_refunds_the_rest() public {
        bytes32 id = openToken("a", 1000);
        vm.prank(payer);
        pc.requestWithdraw(id);
        assertEq(pc.getChannel(id).withdrawAt, block.timestamp + DELAY, "withdrawAt");
        // The payee can still claim during the delay.
        settleAs(payee, one(claimOf(PAYER_KEY, id, 1, 300, 300)));
        vm.warp(block.timestamp + DELAY);
        uint256 before = usd.balanceOf(payer);
        vm.prank(payer);
        pc.withdraw(id);
        assertEq(usd.balanceOf(payer) - before, 700, "refund");
        assertTrue(pc.getChannel(id).closed, "closed");
        assertEq(usd.balanceOf(address(pc)), 0, "contract empty");
    }

    function test_withdraw_rejections() public {
        bytes32 id = openNative("a", 1 ether);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WithdrawNotRequested.selector, id));
        pc.withdraw(id);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.NotPayer.selector, other));
        pc.requestWithdraw(id);
        vm.prank(payer);
        pc.requestWithdraw(id);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.ChannelClosing.selector, id));
        pc.requestWithdraw(id);
        uint64 at = uint64(block.timestamp + DELAY);
        vm.warp(at - 1);
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.WithdrawTooEarly.selector, at));
        pc.withdraw(id);
        vm.warp(at);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.NotPayer.selector, other));
        pc.withdraw(id);
        uint256 before = payer.balance;
        vm.prank(payer);
        pc.withdraw(id);
        assertEq(payer.balance - before, 1 ether, "refund");
        // Double withdraw.
        vm.prank(payer);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.ChannelClosed.selector, id));
        pc.withdraw(id);
    }
}

contract CloseTest is ChannelsBase {
    function invalid(uint8 reason) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(PaymentChannels.InvalidClaim.selector, reason);
    }

    function expectCloseRevert(PaymentChannels.Claim memory c, bytes memory payeeSig, bytes memory err) internal {
        vm.expectRevert(err);
        pc.closeCooperative(c, payeeSig);
    }

    function test_close_cooperative_pays_and_refunds() public {
        bytes32 id = openToken("a", 1000);
        settleAs(payee, one(claimOf(PAYER_KEY, id, 1, 200, 200)));
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 2, 450, 420);
        uint256 payerBefore = usd.balanceOf(payer);
        vm.prank(payer);
        pc.closeCooperative(c, closeSig(PAYEE_KEY, id, 420));
        assertEq(usd.balanceOf(payee), 420, "payee total");
        assertEq(usd.balanceOf(payer) - payerBefore, 580, "refund");
        assertTrue(pc.getChannel(id).closed, "closed");
        assertEq(usd.balanceOf(address(pc)), 0, "empty");
        // Closed: no second close.
        bytes memory sig = closeSig(PAYEE_KEY, id, 420);
        vm.expectRevert(abi.encodeWithSelector(PaymentChannels.ChannelClosed.selector, id));
        pc.closeCooperative(c, sig);
    }

    function test_close_cooperative_with_compact_payee_signature_and_native() public {
        bytes32 id = openNative("a", 1 ether);
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 1, 0.3 ether, 0.3 ether);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(PAYEE_KEY, pc.closeDigest(id, 0.3 ether));
        bytes memory compact = abi.encodePacked(r, bytes32(uint256(s) | (uint256(v - 27) << 255)));
        uint256 payerBefore = payer.balance;
        uint256 payeeBefore = payee.balance;
        pc.closeCooperative(c, compact);
        assertEq(payee.balance - payeeBefore, 0.3 ether, "paid");
        assertEq(payer.balance - payerBefore, 0.7 ether, "refund");
    }

    function test_close_cooperative_rejections() public {
        bytes32 id = openToken("a", 1000);
        settleAs(payee, one(claimOf(PAYER_KEY, id, 5, 500, 500)));
        PaymentChannels.Claim memory c = claimOf(PAYER_KEY, id, 6, 600, 600);
        expectCloseRevert(c, closeSig(OTHER_KEY, id, 600), abi.encodeWithSelector(PaymentChannels.InvalidPayeeSignature.selector));
        expectCloseRevert(c, closeSig(PAYEE_KEY, id, 599), abi.encodeWithSelector(PaymentChannels.InvalidPayeeSignature.selector));
        expectCloseRevert(c, hex"1234", abi.encodeWithSelector(PaymentChannels.InvalidPayeeSignature.selector));
        expectCloseRevert(claimOf(OTHER_KEY, id, 6, 600, 600), closeSig(PAYEE_KEY, id, 600), invalid(1));
        expectCloseRevert(claimOf(PAYER_KEY, id, 6, 600, 400), closeSig(PAYEE_KEY, id, 400), invalid(7));
        expectCloseRevert(claimOf(PAYER_KEY, id, 4, 600, 600), closeSig(PAYEE_KEY, id, 600), invalid(8));
        expectCloseRevert(claimOf(PAYER_KEY, id, 6, 2000, 1001), closeSig(PAYEE_KEY, id, 1001), invalid(6));
        expectCloseRevert(claimOf(PAYER_KEY, id, 6, 600, 601), closeSig(PAYEE_KEY, id, 601), invalid(5));
        assertEq(usd.balanceOf(payee), 500, "nothing moved");
        // Closing at exactly the claimed amount refunds the rest.
        pc.closeCooperative(claimOf(PAYER_KEY, id, 6, 600, 500), closeSig(PAYEE_KEY, id, 500));
        assertEq(usd.balanceOf(payee), 500, "nothing more paid");
        assertTrue(pc.getChannel(id).closed, "closed");
    }
}

contract ReentrancyTest is ChannelsBase {
    ReentrantToken internal evil;

    function setUp() public override {
        super.setUp();
        evil = new ReentrantToken();
        evil.mint(payer, 1e18);
        vm.prank(payer);
        evil.approve(address(pc), type(uint256).max);
    }

    function test_reentrant_token_cannot_reenter_settle() public {
        vm.prank(payer);
        bytes32 id = pc.open(payee, address(evil), "e", 1000, DELAY);
        PaymentChannels.Claim[] memory cs = one(claimOf(PAYER_KEY, id, 1, 500, 500));
        // During the payout transfer, the token replays the same batch.
        evil.arm(address(pc), abi.encodeCall(PaymentChannels.settle, (cs)));
        settleAs(payee, cs);
        assertTrue(!evil.reentered(), "reentry failed");
        assertEq(bytes32(evil.reentryError()), bytes32(PaymentChannels.Reentrancy.selector), "with Reentrancy");
        assertEq(evil.balanceOf(payee), 500, "paid once");
    }

    function test_reentrant_token_cannot_reenter_withdraw_or_open() public {
        vm.prank(payer);
        bytes32 id = pc.open(payee, address(evil), "e", 1000, DELAY);
        vm.prank(payer);
        pc.requestWithdraw(id);
        vm.warp(block.timestamp + DELAY);
        evil.arm(address(pc), abi.encodeCall(PaymentChannels.withdraw, (id)));
        vm.prank(payer);
        pc.withdraw(id);
        assertTrue(!evil.reentered(), "withdraw reentry failed");
        assertEq(evil.balanceOf(address(pc)), 0, "refunded once");

        evil.arm(address(pc), abi.encodeCall(PaymentChannels.topUp, (id, 1)));
        vm.prank(payer);
        pc.open(payee, address(evil), "f", 10, DELAY);
        assertTrue(!evil.reentered(), "open reentry failed");
    }
}

contract ViewsTest is ChannelsBase {
    function test_domain_separator_and_digests() public view {
        bytes32 expected = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("PayStream"),
                keccak256("1"),
                block.chainid,
                address(pc)
            )
        );
        assertEq(pc.DOMAIN_SEPARATOR(), expected, "separator");
        bytes32 sh = keccak256(abi.encode(pc.CHANNEL_STATE_TYPEHASH(), bytes32("c"), uint64(3), uint128(4)));
        assertEq(pc.stateDigest("c", 3, 4), keccak256(abi.encodePacked(hex"1901", expected, sh)), "state digest");
        bytes32 ch = keccak256(abi.encode(pc.CLOSE_TYPEHASH(), bytes32("c"), uint128(4)));
        assertEq(pc.closeDigest("c", 4), keccak256(abi.encodePacked(hex"1901", expected, ch)), "close digest");
    }

    function test_domain_separator_follows_a_fork() public {
        bytes32 before = pc.DOMAIN_SEPARATOR();
        vm.chainId(block.chainid + 1);
        assertTrue(pc.DOMAIN_SEPARATOR() != before, "rebuilt for the new chain id");
    }
}
