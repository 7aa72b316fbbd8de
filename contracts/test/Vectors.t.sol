// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity ^0.8.28;

import {TestBase, Vm} from "./Vm.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {MockERC20} from "./Mocks.sol";

/// @dev The shared EIP-712 vectors (viem, checked against ethers): the contract's channel id,
/// DOMAIN_SEPARATOR, stateDigest and closeDigest agree with every case, the signatures recover
/// the payer and payee, the compact forms settle, and the high-s twins are refused.
contract VectorsTest is TestBase {
    string internal json;

    struct Case {
        uint256 chainId;
        address contractAddress;
        address payer;
        address payee;
        address token;
        bytes32 salt;
        bytes32 channelId;
        uint64 nonce;
        uint128 cumulative;
        uint128 closeAmount;
        bytes32 domainSeparator;
        bytes32 digest;
        bytes32 closeDigest;
        bytes signature;
        bytes32 r;
        bytes32 vs;
        bytes highS;
        bytes closeSignature;
    }

    function setUp() public {
        json = vm.readFile("../tests/vectors/channel_state.json");
    }

    function load(uint256 i) internal view returns (Case memory c) {
        string memory p = string.concat(".cases[", vm.toString(i), "]");
        c.chainId = vm.parseJsonUint(json, string.concat(p, ".chainId"));
        c.contractAddress = vm.parseJsonAddress(json, string.concat(p, ".verifyingContract"));
        c.payer = vm.parseJsonAddress(json, string.concat(p, ".payer"));
        c.payee = vm.parseJsonAddress(json, string.concat(p, ".payee"));
        c.token = vm.parseJsonAddress(json, string.concat(p, ".token"));
        c.salt = vm.parseJsonBytes32(json, string.concat(p, ".salt"));
        c.channelId = vm.parseJsonBytes32(json, string.concat(p, ".channelId"));
        c.nonce = uint64(vm.parseJsonUint(json, string.concat(p, ".nonce")));
        c.cumulative = uint128(vm.parseJsonUint(json, string.concat(p, ".cumulative")));
        c.closeAmount = uint128(vm.parseJsonUint(json, string.concat(p, ".closeAmount")));
        c.domainSeparator = vm.parseJsonBytes32(json, string.concat(p, ".domainSeparator"));
        c.digest = vm.parseJsonBytes32(json, string.concat(p, ".digest"));
        c.closeDigest = vm.parseJsonBytes32(json, string.concat(p, ".closeDigest"));
        c.signature = vm.parseJsonBytes(json, string.concat(p, ".signature"));
        c.r = vm.parseJsonBytes32(json, string.concat(p, ".compact.r"));
        c.vs = vm.parseJsonBytes32(json, string.concat(p, ".compact.vs"));
        c.highS = vm.parseJsonBytes(json, string.concat(p, ".highSSignature"));
        c.closeSignature = vm.parseJsonBytes(json, string.concat(p, ".closeSignature"));
    }

    function count() internal view returns (uint256 n) {
        while (vm.keyExistsJson(json, string.concat(".cases[", vm.toString(n), "]"))) ++n;
    }

    /// Deploys the contract's code at the vector's address on the vector's chain.
    function deployAt(Case memory c) internal returns (PaymentChannels pc) {
        vm.chainId(c.chainId);
        vm.etch(c.contractAddress, address(new PaymentChannels()).code);
        pc = PaymentChannels(c.contractAddress);
    }

    function split(bytes memory sig) internal pure returns (bytes32 r, bytes32 s, uint8 v) {
        assembly {
            r := mload(add(sig, 0x20))
            s := mload(add(sig, 0x40))
            v := byte(0, mload(add(sig, 0x60)))
        }
    }

    function test_vectors_digests_and_channel_ids() public {
        uint256 n = count();
        assertEq(n, 8, "cases");
        for (uint256 i; i < n; ++i) {
            Case memory c = load(i);
            PaymentChannels pc = deployAt(c);
            assertEq(pc.DOMAIN_SEPARATOR(), c.domainSeparator, "domain separator");
            assertEq(pc.channelIdOf(c.payer, c.payee, c.token, c.salt), c.channelId, "channel id");
            assertEq(pc.stateDigest(c.channelId, c.nonce, c.cumulative), c.digest, "state digest");
            assertEq(pc.closeDigest(c.channelId, c.closeAmount), c.closeDigest, "close digest");
        }
    }

    function test_vectors_signatures_recover_and_compact_form_matches() public {
        for (uint256 i; i < count(); ++i) {
            Case memory c = load(i);
            (bytes32 r, bytes32 s, uint8 v) = split(c.signature);
            assertEq(ecrecover(c.digest, v, r, s), c.payer, "payer signature");
            assertEq(r, c.r, "compact r");
            assertEq(c.vs, bytes32(uint256(s) | (uint256(v - 27) << 255)), "compact vs");
            (bytes32 cr, bytes32 cs, uint8 cv) = split(c.closeSignature);
            assertEq(ecrecover(c.closeDigest, cv, cr, cs), c.payee, "payee close signature");
        }
    }

    /// Opens each vector's channel (a mock token etched at the vector's token address), settles
    /// the vector's compact signature where the amounts fit a deposit, and refuses its high-s twin.
    function test_vectors_settle_and_high_s_twins_are_skipped() public {
        uint256 settled;
        for (uint256 i; i < count(); ++i) {
            Case memory c = load(i);
            PaymentChannels pc = deployAt(c);
            uint128 deposit = c.cumulative;
            if (deposit == 0 || deposit > type(uint96).max) continue;
            vm.deal(c.payer, uint256(deposit) + 1 ether);
            if (c.token != address(0)) {
                vm.etch(c.token, address(new MockERC20()).code);
                MockERC20(c.token).mint(c.payer, deposit);
                vm.prank(c.payer);
                MockERC20(c.token).approve(address(pc), deposit);
            }
            vm.prank(c.payer);
            bytes32 id = pc.open{value: c.token == address(0) ? deposit : 0}(c.payee, c.token, c.salt, deposit, 1 hours);
            assertEq(id, c.channelId, "opened id");

            (bytes32 hr, bytes32 hs, uint8 hv) = split(c.highS);
            PaymentChannels.Claim[] memory cs = new PaymentChannels.Claim[](2);
            cs[0] = PaymentChannels.Claim(id, c.nonce, c.cumulative, c.cumulative, hr, bytes32(uint256(hs) | (uint256(hv - 27) << 255)));
            cs[1] = PaymentChannels.Claim(id, c.nonce, c.cumulative, c.cumulative, c.r, c.vs);
            vm.recordLogs();
            vm.prank(c.payee);
            pc.settle(cs);
            Vm.Log[] memory logs = vm.getRecordedLogs();
            uint256 skips;
            for (uint256 j; j < logs.length; ++j) {
                if (logs[j].topics[0] == PaymentChannels.ClaimSkipped.selector) {
                    ++skips;
                    (uint256 index, uint8 reason) = abi.decode(logs[j].data, (uint256, uint8));
                    assertEq(index, 0, "the first claim");
                    assertEq(reason, pc.SKIP_BAD_SIGNATURE(), "high-s reason");
                }
            }
            assertEq(skips, 1, "the high-s twin is skipped");
            assertEq(pc.getChannel(id).claimed, c.cumulative, "the vector's signature settles");
            ++settled;
        }
        assertTrue(settled >= 4, "most vectors settle");
    }
}
