// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity ^0.8.28;

/// @title PaymentChannels: PayStream's settlement contract.
/// @notice A payer deposits for one payee in one token (native ETH when the token is the zero
/// address) and signs EIP-712 `ChannelState(channelId, nonce, cumulative)` states off-chain; the
/// payee (or an operator it registered) claims what was consumed, in batches. No owner, no
/// upgrade path.
/// @dev Storage is split so that a claim touches one storage slot. Each channel has a static
/// record keyed by its id (payer, payee, token, withdrawal timing) and a balance slot (deposit,
/// claimed, claimed nonce, packed in 256 bits) keyed by `keccak256(channelId, payer, payee,
/// token)`. `settle` recovers the signer and reads the balance slot under the key of the signer
/// and the route (payee, token) of the claim before it: a hit proves the signer is the payer and
/// the route is the one already authorized in this call, with one cold storage read. A miss
/// falls back to the static record, which either authorizes a new route or names the reason the
/// claim is skipped. Deposits are therefore capped at 2^96 - 1 base units per channel.
contract PaymentChannels {
    // ------------------------------------------------------------------ types

    /// @notice A claim on a channel: the payer's signed state and the amount taken under it.
    struct Claim {
        bytes32 channelId;
        uint64 nonce;
        uint128 cumulative;
        uint128 amount;
        bytes32 r;
        bytes32 vs;
    }

    /// @notice A channel's fields, as returned by `getChannel`.
    struct ChannelView {
        address payer;
        address payee;
        address token;
        uint128 deposit;
        uint128 claimed;
        uint64 claimedNonce;
        uint32 withdrawDelay;
        uint64 withdrawAt;
        bool closed;
    }

    /// @dev The part of a channel a claim does not need on its fast path.
    struct Channel {
        address payer;
        uint32 withdrawDelay;
        uint64 withdrawAt;
        address payee;
        bool closed;
        address token;
    }

    // ------------------------------------------------------------------ events

    /// @notice A channel was opened with a deposit.
    event Opened(
        bytes32 indexed channelId,
        address indexed payer,
        address indexed payee,
        address token,
        bytes32 salt,
        uint128 deposit,
        uint32 withdrawDelay
    );
    /// @notice A channel's deposit grew.
    event ToppedUp(bytes32 indexed channelId, uint128 amount, uint128 deposit);
    /// @notice A payee allowed or disallowed an operator to claim for it.
    event OperatorSet(address indexed payee, address indexed operator, bool allowed);
    /// @notice A run of claims with the same payee and token was paid in one transfer of
    /// `amount`. `channelIds` lists the channels whose claim was paid, in batch order; each one's
    /// claimed total is now its claim's `amount` and its claimed nonce the claim's `nonce`.
    /// One event per run, not per claim: a log per claim would cost about 1,400 gas each.
    event Settled(address indexed payee, address indexed token, uint256 amount, bytes32[] channelIds);
    /// @notice The claim at position `index` of a batch was skipped; see the `SKIP_*` codes.
    /// Every claim of a batch not named by a `ClaimSkipped` was paid.
    event ClaimSkipped(bytes32 indexed channelId, uint256 index, uint8 reason);
    /// @notice The payer started the withdrawal delay.
    event WithdrawRequested(bytes32 indexed channelId, uint64 withdrawAt);
    /// @notice The payer withdrew the unclaimed deposit; the channel is closed.
    event Withdrawn(bytes32 indexed channelId, uint128 refund);
    /// @notice The channel was closed with the payee's consent: `paid` to the payee, `refund`
    /// to the payer.
    event ClosedCooperatively(bytes32 indexed channelId, uint128 claimed, uint128 paid, uint128 refund);

    // ------------------------------------------------------------------ errors

    error WithdrawDelayOutOfRange(uint32 withdrawDelay);
    error ZeroAmount();
    error DepositTooLarge(uint256 deposit);
    error WrongValue(uint256 expected, uint256 got);
    error ZeroPayee();
    error ChannelExists(bytes32 channelId);
    error UnknownChannel(bytes32 channelId);
    error ChannelClosed(bytes32 channelId);
    error ChannelClosing(bytes32 channelId);
    error NotPayer(address caller);
    error WithdrawNotRequested(bytes32 channelId);
    error WithdrawTooEarly(uint64 withdrawAt);
    error InvalidClaim(uint8 reason);
    error InvalidPayeeSignature();
    error TokenTransferFailed(address token);
    error NativeTransferFailed(address to);
    error Reentrancy();

    // ------------------------------------------------------------------ constants

    /// @notice The shortest withdrawal delay a channel may choose.
    uint32 public constant MIN_WITHDRAW_DELAY = 15 minutes;
    /// @notice The longest withdrawal delay a channel may choose.
    uint32 public constant MAX_WITHDRAW_DELAY = 30 days;

    /// @notice `keccak256("ChannelState(bytes32 channelId,uint64 nonce,uint128 cumulative)")`.
    bytes32 public constant CHANNEL_STATE_TYPEHASH =
        keccak256("ChannelState(bytes32 channelId,uint64 nonce,uint128 cumulative)");
    /// @notice `keccak256("Close(bytes32 channelId,uint128 amount)")`.
    bytes32 public constant CLOSE_TYPEHASH = keccak256("Close(bytes32 channelId,uint128 amount)");
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("PayStream");
    bytes32 private constant VERSION_HASH = keccak256("1");

    /// @dev Half the secp256k1 order: signatures with a larger `s` are malleable twins.
    uint256 private constant HALF_ORDER = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0;
    uint256 private constant MAX_DEPOSIT = 0xffffffffffffffffffffffff; // type(uint96).max

    /// @notice Skip reason: the signature is malformed, high-s, or not the payer's.
    uint8 public constant SKIP_BAD_SIGNATURE = 1;
    /// @notice Skip reason: no channel has this id.
    uint8 public constant SKIP_UNKNOWN_CHANNEL = 2;
    /// @notice Skip reason: the channel was withdrawn or closed.
    uint8 public constant SKIP_CLOSED = 3;
    /// @notice Skip reason: the caller is neither the payee nor an operator it registered.
    uint8 public constant SKIP_NOT_PAYEE = 4;
    /// @notice Skip reason: `amount > cumulative`.
    uint8 public constant SKIP_EXCEEDS_CUMULATIVE = 5;
    /// @notice Skip reason: `amount > deposit`.
    uint8 public constant SKIP_EXCEEDS_DEPOSIT = 6;
    /// @notice Skip reason: `amount <= claimed` (already settled; resubmission is harmless).
    uint8 public constant SKIP_ALREADY_CLAIMED = 7;
    /// @notice Skip reason: the nonce is below the last claimed nonce.
    uint8 public constant SKIP_STALE_NONCE = 8;

    // ------------------------------------------------------------------ storage

    mapping(bytes32 channelId => Channel) private _channels;
    /// @dev balance key => deposit (bits 0-95) | claimed (96-191) | claimed nonce (192-255).
    mapping(bytes32 balanceKey => uint256) private _balances;
    /// @notice Whether `operator` may claim for `payee`.
    mapping(address payee => mapping(address operator => bool)) public isOperator;

    uint256 private immutable _cachedChainId;
    address private immutable _cachedThis;
    bytes32 private immutable _cachedDomainSeparator;

    bool private transient _locked;

    constructor() {
        _cachedChainId = block.chainid;
        _cachedThis = address(this);
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    modifier nonReentrant() {
        if (_locked) revert Reentrancy();
        _locked = true;
        _;
        _locked = false;
    }

    // ------------------------------------------------------------------ payer

    /// @notice Opens a channel for `payee` in `token` with a deposit of `amount`.
    /// @param withdrawDelay seconds between `requestWithdraw` and `withdraw`, in
    /// [MIN_WITHDRAW_DELAY, MAX_WITHDRAW_DELAY]: how long the payee has to claim.
    function open(address payee, address token, bytes32 salt, uint128 amount, uint32 withdrawDelay)
        external
        payable
        nonReentrant
        returns (bytes32 channelId)
    {
        if (payee == address(0)) revert ZeroPayee();
        if (amount == 0) revert ZeroAmount();
        if (amount > MAX_DEPOSIT) revert DepositTooLarge(amount);
        if (withdrawDelay < MIN_WITHDRAW_DELAY || withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert WithdrawDelayOutOfRange(withdrawDelay);
        }
        channelId = channelIdOf(msg.sender, payee, token, salt);
        if (_channels[channelId].payer != address(0)) revert ChannelExists(channelId);

        _channels[channelId] = Channel({
            payer: msg.sender,
            withdrawDelay: withdrawDelay,
            withdrawAt: 0,
            payee: payee,
            closed: false,
            token: token
        });
        _balances[_balanceKey(channelId, msg.sender, payee, token)] = amount;
        emit Opened(channelId, msg.sender, payee, token, salt, amount, withdrawDelay);

        _pull(token, amount);
    }

    /// @notice Adds `amount` to an open channel's deposit. Anyone may top up; the unclaimed
    /// deposit always returns to the payer.
    function topUp(bytes32 channelId, uint128 amount) external payable nonReentrant {
        if (amount == 0) revert ZeroAmount();
        Channel storage ch = _openChannel(channelId);
        if (ch.withdrawAt != 0) revert ChannelClosing(channelId);
        address token = ch.token;
        bytes32 key = _balanceKey(channelId, ch.payer, ch.payee, token);
        uint256 packed = _balances[key];
        uint256 deposit = (packed & MAX_DEPOSIT) + amount;
        if (deposit > MAX_DEPOSIT) revert DepositTooLarge(deposit);
        _balances[key] = (packed & ~MAX_DEPOSIT) | deposit;
        emit ToppedUp(channelId, amount, uint128(deposit));

        _pull(token, amount);
    }

    /// @notice Starts the withdrawal delay; the payee's settler must claim before it ends.
    function requestWithdraw(bytes32 channelId) external {
        Channel storage ch = _openChannel(channelId);
        if (msg.sender != ch.payer) revert NotPayer(msg.sender);
        if (ch.withdrawAt != 0) revert ChannelClosing(channelId);
        uint64 withdrawAt = uint64(block.timestamp) + ch.withdrawDelay;
        ch.withdrawAt = withdrawAt;
        emit WithdrawRequested(channelId, withdrawAt);
    }

    /// @notice After the delay, returns `deposit - claimed` to the payer and closes the channel.
    function withdraw(bytes32 channelId) external nonReentrant {
        Channel storage ch = _openChannel(channelId);
        address payer = ch.payer;
        if (msg.sender != payer) revert NotPayer(msg.sender);
        uint64 withdrawAt = ch.withdrawAt;
        if (withdrawAt == 0) revert WithdrawNotRequested(channelId);
        if (block.timestamp < withdrawAt) revert WithdrawTooEarly(withdrawAt);

        address token = ch.token;
        bytes32 key = _balanceKey(channelId, payer, ch.payee, token);
        uint256 packed = _balances[key];
        uint128 refund = uint128((packed & MAX_DEPOSIT) - ((packed >> 96) & MAX_DEPOSIT));
        ch.closed = true;
        delete _balances[key];
        emit Withdrawn(channelId, refund);

        _push(token, payer, refund);
    }

    // ------------------------------------------------------------------ payee

    /// @notice Lets `operator` claim for the caller (a settler key that holds no funds).
    function setOperator(address operator, bool allowed) external {
        isOperator[msg.sender][operator] = allowed;
        emit OperatorSet(msg.sender, operator, allowed);
    }

    /// @notice Claims a batch. Each claim pays `amount - claimed` to the channel's payee if the
    /// payer signed `(channelId, nonce, cumulative)`, `amount <= cumulative`,
    /// `amount <= deposit`, `amount > claimed` and `nonce >= last claimed nonce`; otherwise it is
    /// skipped with `ClaimSkipped` and the batch goes on. Consecutive claims with the same payee
    /// and token are paid in one transfer.
    function settle(Claim[] calldata claims) external nonReentrant {
        bytes32 separator = _domainSeparator();
        uint256 n = claims.length;
        uint256 p;
        // The current run's Settled data, built in memory as the claims are paid:
        // [amount][0x40][count][channel ids...], room for every claim.
        uint256 run;
        assembly ("memory-safe") {
            p := claims.offset
            run := mload(0x40)
            mstore(0x40, add(run, mul(add(n, 3), 0x20)))
            mstore(add(run, 0x40), 0)
        }
        address runPayee;
        address runToken;
        uint256 runTotal;
        for (uint256 i; i < n;) {
            address signer = _recoverAt(p, separator);
            if (signer == address(0)) {
                _skip(p, i, SKIP_BAD_SIGNATURE);
            } else {
                (uint256 slot, uint256 packed) = _balanceSlot(p, signer, runPayee, runToken);
                if (packed == 0) {
                    // Not on the current route, not the payer's signature, or closed: the
                    // static record says which, and authorizes a new route.
                    (uint8 reason, address payee, address token) = _authorize(bytes32(_word(p)), signer);
                    if (reason != 0) {
                        _skip(p, i, reason);
                        unchecked {
                            ++i;
                            p += 0xc0;
                        }
                        continue;
                    }
                    if (payee != runPayee || token != runToken) {
                        _flush(run, runPayee, runToken, runTotal);
                        (runPayee, runToken, runTotal) = (payee, token, 0);
                    }
                    (slot, packed) = _balanceSlot(p, signer, payee, token);
                }
                unchecked {
                    // A run's total is at most the sum of its channels' deposits (96 bits each).
                    runTotal += _apply(p, i, slot, packed, run);
                }
            }
            unchecked {
                ++i;
                p += 0xc0;
            }
        }
        _flush(run, runPayee, runToken, runTotal);
    }

    /// @dev Emits the run's `Settled` and pays its total; nothing for an empty run.
    function _flush(uint256 run, address payee, address token, uint256 total) private {
        uint256 count;
        assembly ("memory-safe") {
            count := mload(add(run, 0x40))
        }
        if (count == 0) return;
        bytes32 topic = Settled.selector;
        assembly ("memory-safe") {
            mstore(run, total)
            mstore(add(run, 0x20), 0x40)
            log3(run, add(0x60, mul(count, 0x20)), topic, payee, token)
            mstore(add(run, 0x40), 0)
        }
        _push(token, payee, total);
    }

    /// @dev The balance slot of the claim at `p` under `signer` and a route, and its value.
    function _balanceSlot(uint256 p, address signer, address payee, address token)
        private
        view
        returns (uint256 slot, uint256 packed)
    {
        assembly ("memory-safe") {
            // _balances[keccak256(channelId, signer, payee, token)]
            let m := mload(0x40)
            mstore(m, calldataload(p))
            mstore(add(m, 0x20), signer)
            mstore(add(m, 0x40), payee)
            mstore(add(m, 0x60), token)
            mstore(0x00, keccak256(m, 0x80))
            mstore(0x20, _balances.slot)
            slot := keccak256(0x00, 0x40)
            packed := sload(slot)
        }
    }

    /// @dev The signer of the claim at calldata offset `p`, or zero (high-s, failed recovery).
    /// Reverts on values wider than their ABI types, as the ABI decoder would.
    function _recoverAt(uint256 p, bytes32 separator) private view returns (address signer) {
        bytes32 typehash = CHANNEL_STATE_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40)
            let nonce := calldataload(add(p, 0x20))
            let cumulative := calldataload(add(p, 0x40))
            if or(shr(64, nonce), or(shr(128, cumulative), shr(128, calldataload(add(p, 0x60))))) {
                revert(0, 0)
            }
            // digest = keccak256(0x1901 || separator || keccak256(typehash, id, nonce, cumulative))
            mstore(m, typehash)
            mstore(add(m, 0x20), calldataload(p))
            mstore(add(m, 0x40), nonce)
            mstore(add(m, 0x60), cumulative)
            let structHash := keccak256(m, 0x80)
            mstore(m, 0x1901)
            mstore(add(m, 0x20), separator)
            mstore(add(m, 0x40), structHash)
            let digest := keccak256(add(m, 0x1e), 0x42)
            // ecrecover(digest, v, r, s) from the EIP-2098 (r, vs); high-s is refused.
            let vs := calldataload(add(p, 0xa0))
            let s := and(vs, 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff)
            if iszero(gt(s, HALF_ORDER)) {
                mstore(m, digest)
                mstore(add(m, 0x20), add(shr(255, vs), 27))
                mstore(add(m, 0x40), calldataload(add(p, 0x80)))
                mstore(add(m, 0x60), s)
                mstore(0x00, 0)
                pop(staticcall(gas(), 0x01, m, 0x80, 0x00, 0x20))
                signer := mload(0x00)
            }
        }
    }

    /// @dev The amount checks of the claim at `p` (position `i`), whose signer and route are
    /// proven: writes the balance slot and records the channel in the run, or emits
    /// `ClaimSkipped` and pays nothing.
    function _apply(uint256 p, uint256 i, uint256 slot, uint256 packed, uint256 run) private returns (uint256 paid) {
        bytes32 skippedTopic = ClaimSkipped.selector;
        assembly ("memory-safe") {
            let nonce := calldataload(add(p, 0x20))
            let amount := calldataload(add(p, 0x60))
            let claimed := and(shr(96, packed), MAX_DEPOSIT)
            let skip := 0
            switch gt(amount, calldataload(add(p, 0x40)))
            case 1 { skip := SKIP_EXCEEDS_CUMULATIVE }
            default {
                switch gt(amount, and(packed, MAX_DEPOSIT))
                case 1 { skip := SKIP_EXCEEDS_DEPOSIT }
                default {
                    switch iszero(gt(amount, claimed))
                    case 1 { skip := SKIP_ALREADY_CLAIMED }
                    default { if lt(nonce, shr(192, packed)) { skip := SKIP_STALE_NONCE } }
                }
            }
            switch skip
            case 0 {
                sstore(slot, or(and(packed, MAX_DEPOSIT), or(shl(96, amount), shl(192, nonce))))
                paid := sub(amount, claimed)
                let count := mload(add(run, 0x40))
                mstore(add(add(run, 0x60), mul(count, 0x20)), calldataload(p))
                mstore(add(run, 0x40), add(count, 1))
            }
            default {
                mstore(0x00, i)
                mstore(0x20, skip)
                log2(0x00, 0x40, skippedTopic, calldataload(p))
            }
        }
    }

    function _word(uint256 p) private pure returns (uint256 w) {
        assembly {
            w := calldataload(p)
        }
    }

    function _skip(uint256 p, uint256 i, uint8 reason) private {
        emit ClaimSkipped(bytes32(_word(p)), i, reason);
    }

    /// @dev Why `signer` cannot claim on `channelId` for the caller (0 if it can), and the
    /// channel's route.
    function _authorize(bytes32 channelId, address signer)
        private
        view
        returns (uint8 reason, address payee, address token)
    {
        Channel storage ch = _channels[channelId];
        address payer = ch.payer;
        payee = ch.payee;
        token = ch.token;
        if (payer == address(0)) reason = SKIP_UNKNOWN_CHANNEL;
        else if (ch.closed) reason = SKIP_CLOSED;
        else if (signer != payer) reason = SKIP_BAD_SIGNATURE;
        else if (msg.sender != payee && !isOperator[payee][msg.sender]) reason = SKIP_NOT_PAYEE;
    }

    /// @notice Settles `claim` as final and refunds the rest of the deposit to the payer at once,
    /// given the payee's EIP-712 signature over `Close(channelId, claim.amount)`. Anyone may
    /// submit it (usually the payer). The checks are those of `settle`, except that an amount
    /// equal to the claimed total is allowed (nothing more to pay, refund only).
    function closeCooperative(Claim calldata claim, bytes calldata payeeSignature) external nonReentrant {
        bytes32 channelId = claim.channelId;
        Channel storage ch = _openChannel(channelId);
        address payer = ch.payer;
        address payee = ch.payee;
        address token = ch.token;
        bytes32 domainSeparator = _domainSeparator();

        address signer = _recover(_stateDigest(domainSeparator, channelId, claim.nonce, claim.cumulative), claim.r, claim.vs);
        if (signer != payer) revert InvalidClaim(SKIP_BAD_SIGNATURE);
        if (_recoverBytes(_closeDigest(domainSeparator, channelId, claim.amount), payeeSignature) != payee) {
            revert InvalidPayeeSignature();
        }
        bytes32 key = _balanceKey(channelId, payer, payee, token);
        uint256 packed = _balances[key];
        uint256 deposit = packed & MAX_DEPOSIT;
        uint256 claimed = (packed >> 96) & MAX_DEPOSIT;
        uint128 amount = claim.amount;
        if (amount > claim.cumulative) revert InvalidClaim(SKIP_EXCEEDS_CUMULATIVE);
        if (amount > deposit) revert InvalidClaim(SKIP_EXCEEDS_DEPOSIT);
        if (amount < claimed) revert InvalidClaim(SKIP_ALREADY_CLAIMED);
        if (claim.nonce < (packed >> 192)) revert InvalidClaim(SKIP_STALE_NONCE);

        uint128 paid = uint128(amount - claimed);
        uint128 refund = uint128(deposit - amount);
        ch.closed = true;
        delete _balances[key];
        emit ClosedCooperatively(channelId, amount, paid, refund);

        _push(token, payee, paid);
        _push(token, payer, refund);
    }

    // ------------------------------------------------------------------ views

    /// @notice The EIP-712 domain separator: `{name: "PayStream", version: "1", chainId, this}`.
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparator();
    }

    /// @notice The digest a payer signs for a channel state.
    function stateDigest(bytes32 channelId, uint64 nonce, uint128 cumulative) external view returns (bytes32) {
        return _stateDigest(_domainSeparator(), channelId, nonce, cumulative);
    }

    /// @notice The digest a payee signs to close a channel cooperatively at `amount`.
    function closeDigest(bytes32 channelId, uint128 amount) external view returns (bytes32) {
        return _closeDigest(_domainSeparator(), channelId, amount);
    }

    /// @notice The id `open` gives a channel: keccak256(abi.encode(chainid, this, payer, payee,
    /// token, salt)).
    function channelIdOf(address payer, address payee, address token, bytes32 salt) public view returns (bytes32) {
        return keccak256(abi.encode(block.chainid, address(this), payer, payee, token, salt));
    }

    /// @notice A channel's fields; all zero for an unknown id. Deposit, claimed and nonce read
    /// zero once the channel is closed (its events keep the history).
    function getChannel(bytes32 channelId) external view returns (ChannelView memory view_) {
        Channel storage ch = _channels[channelId];
        uint256 packed = _balances[_balanceKey(channelId, ch.payer, ch.payee, ch.token)];
        view_ = ChannelView({
            payer: ch.payer,
            payee: ch.payee,
            token: ch.token,
            deposit: uint128(packed & MAX_DEPOSIT),
            claimed: uint128((packed >> 96) & MAX_DEPOSIT),
            claimedNonce: uint64(packed >> 192),
            withdrawDelay: ch.withdrawDelay,
            withdrawAt: ch.withdrawAt,
            closed: ch.closed
        });
    }

    // ------------------------------------------------------------------ internals

    function _openChannel(bytes32 channelId) private view returns (Channel storage ch) {
        ch = _channels[channelId];
        if (ch.payer == address(0)) revert UnknownChannel(channelId);
        if (ch.closed) revert ChannelClosed(channelId);
    }

    function _domainSeparator() private view returns (bytes32) {
        // Rebuilt after a fork (new chain id) or when the code runs at another address.
        if (block.chainid == _cachedChainId && address(this) == _cachedThis) return _cachedDomainSeparator;
        return _buildDomainSeparator();
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    /// @dev keccak256(0x1901 || separator || keccak256(abi.encode(TYPEHASH, id, nonce, cumulative))),
    /// in scratch memory above the free pointer (not allocated: nothing else uses it meanwhile).
    function _stateDigest(bytes32 separator, bytes32 channelId, uint256 nonce, uint256 cumulative)
        private
        pure
        returns (bytes32 digest)
    {
        bytes32 typehash = CHANNEL_STATE_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, typehash)
            mstore(add(m, 0x20), channelId)
            mstore(add(m, 0x40), nonce)
            mstore(add(m, 0x60), cumulative)
            let structHash := keccak256(m, 0x80)
            mstore(m, 0x1901)
            mstore(add(m, 0x20), separator)
            mstore(add(m, 0x40), structHash)
            digest := keccak256(add(m, 0x1e), 0x42)
        }
    }

    function _closeDigest(bytes32 separator, bytes32 channelId, uint128 amount) private pure returns (bytes32 digest) {
        bytes32 typehash = CLOSE_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, typehash)
            mstore(add(m, 0x20), channelId)
            mstore(add(m, 0x40), amount)
            let structHash := keccak256(m, 0x60)
            mstore(m, 0x1901)
            mstore(add(m, 0x20), separator)
            mstore(add(m, 0x40), structHash)
            digest := keccak256(add(m, 0x1e), 0x42)
        }
    }

    /// @dev The balance slot's key binds the payer and the route, so that finding a non-empty
    /// slot under a recovered signer proves who signed and where the money goes.
    function _balanceKey(bytes32 channelId, address payer, address payee, address token)
        private
        pure
        returns (bytes32 key)
    {
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, channelId)
            mstore(add(m, 0x20), payer)
            mstore(add(m, 0x40), payee)
            mstore(add(m, 0x60), token)
            key := keccak256(m, 0x80)
        }
    }

    /// @dev ecrecover of an EIP-2098 `(r, vs)` signature; zero for high-s or a failed recovery.
    function _recover(bytes32 digest, bytes32 r, bytes32 vs) private view returns (address signer) {
        uint256 s = uint256(vs) & ((1 << 255) - 1);
        if (s > HALF_ORDER) return address(0);
        uint8 v = uint8(uint256(vs) >> 255) + 27;
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, digest)
            mstore(add(m, 0x20), v)
            mstore(add(m, 0x40), r)
            mstore(add(m, 0x60), s)
            mstore(0x00, 0)
            pop(staticcall(gas(), 0x01, m, 0x80, 0x00, 0x20))
            signer := mload(0x00)
        }
    }

    /// @dev Recovers from a 65-byte `r || s || v` or a 64-byte EIP-2098 signature.
    function _recoverBytes(bytes32 digest, bytes calldata signature) private view returns (address) {
        bytes32 r;
        bytes32 vs;
        if (signature.length == 65) {
            bytes32 s;
            uint8 v;
            assembly {
                r := calldataload(signature.offset)
                s := calldataload(add(signature.offset, 0x20))
                v := byte(0, calldataload(add(signature.offset, 0x40)))
            }
            if (v < 27) v += 27;
            if ((v != 27 && v != 28) || uint256(s) >= (1 << 255)) return address(0);
            vs = bytes32(uint256(s) | (uint256(v - 27) << 255));
        } else if (signature.length == 64) {
            assembly {
                r := calldataload(signature.offset)
                vs := calldataload(add(signature.offset, 0x20))
            }
        } else {
            return address(0);
        }
        return _recover(digest, r, vs);
    }

    /// @dev Takes `amount` of `token` (or native ETH) from the caller; the contract's balance
    /// must grow by exactly `amount` (fee-on-transfer tokens are refused).
    function _pull(address token, uint256 amount) private {
        if (token == address(0)) {
            if (msg.value != amount) revert WrongValue(amount, msg.value);
            return;
        }
        if (msg.value != 0) revert WrongValue(0, msg.value);
        uint256 before = _balanceOf(token);
        _call(token, abi.encodeCall(IERC20Minimal.transferFrom, (msg.sender, address(this), amount)));
        if (_balanceOf(token) != before + amount) revert TokenTransferFailed(token);
    }

    /// @dev Sends `amount` of `token` (or native ETH) to `to`; nothing when `amount` is zero.
    function _push(address token, address to, uint256 amount) private {
        if (amount == 0) return;
        if (token == address(0)) {
            (bool ok,) = to.call{value: amount}("");
            if (!ok) revert NativeTransferFailed(to);
        } else {
            _call(token, abi.encodeCall(IERC20Minimal.transfer, (to, amount)));
        }
    }

    /// @dev A token call that accepts tokens returning nothing or `true`.
    function _call(address token, bytes memory data) private {
        (bool ok, bytes memory ret) = token.call(data);
        if (!ok || token.code.length == 0 || (ret.length != 0 && (ret.length < 32 || !abi.decode(ret, (bool))))) {
            revert TokenTransferFailed(token);
        }
    }

    function _balanceOf(address token) private view returns (uint256 balance) {
        (bool ok, bytes memory ret) = token.staticcall(abi.encodeCall(IERC20Minimal.balanceOf, (address(this))));
        if (!ok || ret.length < 32) revert TokenTransferFailed(token);
        balance = abi.decode(ret, (uint256));
    }
}

/// @dev The three ERC-20 functions the contract calls.
interface IERC20Minimal {
    function transfer(address to, uint256 amount) external returns (bool);
    function transferFrom(address from, address to, uint256 amount) external returns (bool);
    function balanceOf(address account) external view returns (uint256);
}
