"""How many prompt tokens OpenVINO GenAI's pipeline takes from its prefix cache: a mirror of its block bookkeeping.

The continuous-batching pipeline reuses the KV blocks of earlier prompts (prefix caching) but reports nothing
about it, per request or in total (2026.4: GenerationHandle, PerfMetrics and PipelineMetrics have no such
field). What it does is deterministic, though, and lives in `BlockManager` / `BlockAllocator`
(src/cpp/src/continuous_batching/cache/block_manager.hpp). This module replays it, for the one sequence per
request that this project uses, from what the pipeline's owner sees: the prompt, the tokens read back each step,
and when a request ends.

What is mirrored (the C++ names in brackets):
- A block holds `block_size` tokens and is known by the hash of the whole sequence up to its last token, so a
  block matches only after the same prefix [Sequence::get_hash]. The last block of a sequence is partial and is
  re-keyed as tokens are appended [append_slots].
- A new request restores its prompt's blocks front to back while they are cached, then at most one partial block
  (the shortest cached length), and stops at the first miss [get_full_prefix_restore_plan]. The tokens restored
  are the request's cached tokens, less one when the whole prompt matched: its last token is computed again for
  its logits [get_processed_tokens_after_restore]. That is what `cached_tokens` reports.
- A finished sequence's blocks stay cached, owned by no one [OverwritableBlocksHashStore]. New blocks come from
  never-used ones first, in index order, then the cached block with the oldest timestamp is overwritten. A
  block's timestamp is set when it is restored or overwritten, never when it is first allocated, so blocks that
  were never reused go first [BlockAllocator::allocate_block, get_lru_block_to_overwrite].
- Copy on write of a shared last block, the one-entry-per-hash rule when two identical blocks are freed, and the
  trim of a restored block beyond the processed tokens [free, free_empty_physical_blocks].

The block size and the number of blocks are measured on the pipeline itself when it starts
(openvino_process._measure_blocks), not assumed.

Limits: the owner does not see how far a prompt's prefill has got between steps, so a request's blocks enter the
mirror when its first token arrives (or it ends). Hence (1) a request that shares a prefix with a prompt still
being prefilled may take some of that prompt's blocks in the pipeline while the mirror reports no hit for them
(it under-reports; two requests added in the same step never share, in either), and (2) a request cancelled
during its prefill leaves blocks in the pipeline that the mirror never saw. Both, and preemption when the KV cache
is full (the pipeline frees a running sequence's blocks and recomputes them later; unseen here), can make the
mirror's choice of which cached block to overwrite differ from the pipeline's once the cache is full. With the
cache not full, and no overlapping prefills of shared prefixes, the count is exact (tests/engine/test_prefix_cache.py
checks it against the pipeline's measured prefill steps).
"""

from __future__ import annotations

import collections
import heapq
import itertools


class _Block:
    __slots__ = ("key", "real", "refs", "stamp")

    def __init__(self, stamp: int, real: bool = True) -> None:
        self.key: int | None = None
        self.refs = 0
        self.stamp = stamp
        self.real = real  # False: a block beyond the cache (the pipeline would have preempted someone instead)


class _Sequence:
    """One request's tokens (prompt, then the generated ones) and the blocks that hold its KV."""

    def __init__(self, prompt: list[int]) -> None:
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.blocks: list[_Block] = []
        self.full_keys: list[int] = []  # key of tokens[: (i + 1) * block_size], filled on demand


class PrefixCache:
    """The pipeline's prefix cache as a mirror: `admit` a request (returns its cached prompt tokens), `extend`
    it with the tokens each step returns, `release` it when it ends. `queries` and `hits` count prompt tokens
    looked up and found, over every admitted request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache of {num_blocks} blocks of {block_size} tokens")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.queries = 0
        self.hits = 0
        self._clock = itertools.count(1)
        # Never-used blocks in the allocator's order; a C++ block's timestamp is its creation time, older than
        # any reuse, so these get stamps below every later one.
        self._free: collections.deque[_Block] = collections.deque(_Block(i - num_blocks) for i in range(num_blocks))
        self._by_key: dict[int, _Block] = {}  # every cached block by key [m_prefix_hash_to_cached_blocks]
        self._idle: dict[int, _Block] = {}  # cached blocks no sequence owns [m_overwriteable_blocks]
        self._lru: list[tuple[int, int, _Block]] = []  # (stamp, tiebreak, block) of idle blocks; stale entries skipped
        self._tiebreak = itertools.count()
        self._sequences: dict[int, _Sequence] = {}

    # --- what the pipeline's owner calls ----------------------------------------------------------
    def admit(self, seq_id: int, prompt: list[int]) -> int:
        """A request added to the pipeline: take its cached blocks, return how many prompt tokens it skips."""
        seq = self._sequences[seq_id] = _Sequence(prompt)
        restored, covered = self._restore_plan(seq)
        for block in restored:
            if self._idle.get(block.key) is block:  # type: ignore[arg-type]
                del self._idle[block.key]  # type: ignore[arg-type]
            block.refs += 1
            block.stamp = next(self._clock)
            seq.blocks.append(block)
        processed = covered - 1 if covered == len(prompt) else covered
        self._trim(seq, processed)
        self.queries += len(prompt)
        self.hits += processed
        return processed

    def extend(self, seq_id: int, token_ids: list[int]) -> None:
        """Tokens a step generated for `seq_id`. All but the last generated token are in the KV cache (the last
        one is computed in the next step), and the whole prompt is once the first token exists."""
        seq = self._sequences.get(seq_id)
        if seq is None or not token_ids:
            return
        seq.tokens.extend(token_ids)
        self._grow(seq, len(seq.tokens) - 1)

    def release(self, seq_id: int) -> None:
        """The request left the pipeline (finished, cancelled, failed): its blocks stay cached, owned by no one."""
        seq = self._sequences.pop(seq_id, None)
        if seq is not None:
            for block in seq.blocks:
                self._free_block(block)

    def owned_blocks(self) -> int:
        """Distinct blocks the running sequences hold (the pipeline's `cache_usage` counts the same)."""
        return len({id(b) for seq in self._sequences.values() for b in seq.blocks})

    # --- the block manager, replayed -----------------------------------------------------------------
    def _key(self, seq: _Sequence, length: int) -> int:
        """The key of `seq.tokens[:length]`: chained over full blocks, so equal keys mean equal prefixes."""
        size = self.block_size
        start = (length - 1) // size * size
        full = start // size  # full blocks before this one
        while len(seq.full_keys) < full:
            i = len(seq.full_keys)
            parent = seq.full_keys[i - 1] if i else 0
            seq.full_keys.append(hash((parent, tuple(seq.tokens[i * size : (i + 1) * size]))))
        parent = seq.full_keys[full - 1] if full else 0
        return hash((parent, tuple(seq.tokens[start:length])))

    def _cached(self, key: int) -> bool:
        return key in self._idle or key in self._by_key

    def _restore_plan(self, seq: _Sequence) -> tuple[list[_Block], int]:
        prompt_len, size = seq.prompt_len, self.block_size
        keys: list[int] = []
        covered = content = 0
        while content < prompt_len:
            previous, content = content, min(content + size, prompt_len)
            key = self._key(seq, content)
            if self._cached(key):
                keys.append(key)
                covered = content
                continue
            for partial in range(previous + 1, content):  # the shortest cached partial block, if any
                key = self._key(seq, partial)
                if self._cached(key):
                    keys.append(key)
                    covered = partial
                    break
            break
        return [self._idle.get(key) or self._by_key[key] for key in keys], covered

    def _trim(self, seq: _Sequence, context: int) -> None:
        """Blocks past what `context` tokens need go back (a whole-prompt hit keeps its last token to compute)."""
        need = -(-context // self.block_size)
        while len(seq.blocks) > need:
            self._free_block(seq.blocks.pop())

    def _grow(self, seq: _Sequence, context: int) -> None:
        """The sequence's first `context` tokens are now in the KV cache [append_slots / allocate]."""
        size = self.block_size
        need, have = -(-context // size), len(seq.blocks)
        if need > have:
            if have:
                last = seq.blocks[-1]
                full = self._key(seq, have * size)
                if last.key != full:
                    self._rekey(last, full)
            length = have * size
            for _ in range(need - have):
                length = min(length + size, context)
                seq.blocks.append(self._allocate(self._key(seq, length)))
        elif need == have and have:
            last, key = seq.blocks[-1], self._key(seq, context)
            if last.refs > 1:  # shared: written into a copy
                seq.blocks[-1] = self._allocate(key)
                self._free_block(last)
            elif last.key != key:
                self._rekey(last, key)
        else:
            self._trim(seq, context)

    def _rekey(self, block: _Block, key: int) -> None:
        if block.key is not None:
            self._by_key.pop(block.key, None)
        block.key = key
        self._by_key[key] = block

    def _allocate(self, key: int) -> _Block:
        if self._free:
            block = self._free.popleft()
        else:
            block = self._pop_oldest_idle() or _Block(0, real=False)
            if block.key is not None:
                self._by_key.pop(block.key, None)
            block.stamp = next(self._clock)
        block.refs = 1
        block.key = key
        self._by_key[key] = block
        return block

    def _pop_oldest_idle(self) -> _Block | None:
        while self._lru:
            stamp, _, block = heapq.heappop(self._lru)
            if block.refs == 0 and block.stamp == stamp and self._idle.get(block.key) is block:  # type: ignore[arg-type]
                del self._idle[block.key]  # type: ignore[arg-type]
                return block
        return None

    def _free_block(self, block: _Block) -> None:
        block.refs -= 1
        if block.refs > 0 or block.key is None:
            return
        if not block.real:
            if self._by_key.get(block.key) is block:
                del self._by_key[block.key]
            return
        older = self._idle.pop(block.key, None)
        if older is not None and older is not block:  # one cached block per key: the older one is plain free
            self._free.append(older)
            if self._by_key.get(block.key) is older:
                self._by_key[block.key] = block
        self._idle[block.key] = block
        heapq.heappush(self._lru, (block.stamp, next(self._tiebreak), block))
        if len(self._lru) > 2 * len(self._idle) + 64:  # drop stale entries now and then
            self._lru = [(b.stamp, next(self._tiebreak), b) for b in self._idle.values()]
            heapq.heapify(self._lru)
