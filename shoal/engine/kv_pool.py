"""How many bytes the paged KV cache gets when the user does not say (--kv-cache-memory): enough for
max_num_seqs full contexts, bounded by what the device can spare. LLM and each rank of a split model ask
here, so one rule sizes every pool, and the answer says why, for the server to print.

On a CPU the pool lives in RAM that the OS, the weights and everything else share, so the default is at
most CPU_DEFAULT_BYTES (vLLM's CPU backend reserves a fixed 4 GiB, VLLM_CPU_KVCACHE_SPACE) rather than
80% of free memory: a 16B model on a 24 GiB machine otherwise takes 20 GiB and the kernel kills it at
the next allocation anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

CPU_DEFAULT_BYTES = 4 << 30
FREE_FRACTION = 0.8  # of the device's free memory, at most, on an accelerator (and on a CPU under 4 GiB)


@dataclass(frozen=True)
class KVPool:
    bytes: int
    reason: str

    def describe(self) -> str:
        return f"KV cache pool {self.bytes / (1 << 30):.2f} GiB: {self.reason}"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def default_kv_pool(bytes_per_token: int, max_len: int, max_num_seqs: int, free_bytes: int, on_cpu: bool) -> KVPool:
    """The pool for max_num_seqs contexts of max_len tokens, capped by the device (see the module note);
    never less than one full context, so any request the engine accepts can run."""
    one = bytes_per_token * max_len
    wanted = one * max_num_seqs
    spare = int(FREE_FRACTION * free_bytes)
    cap, limit = (min(CPU_DEFAULT_BYTES, spare), "the CPU default of at most 4 GiB") if on_cpu else (spare, "80% of free memory")
    need = f"{max_num_seqs} sequences x {max_len} tokens need {_gib(wanted)}"
    if wanted <= cap:
        return KVPool(wanted, f"{need} (within {limit}); --kv-cache-memory to change it")
    if one > cap:
        return KVPool(one, f"one {max_len}-token context needs {_gib(one)}, over {limit}; "
                           "--max-model-len to serve shorter contexts, --kv-cache-memory to set the pool")
    return KVPool(cap, f"{need}, capped at {limit}; --max-num-seqs / --max-model-len shrink the need, "
                       "--kv-cache-memory sets the pool")
