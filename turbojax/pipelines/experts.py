"""Where the DiT experts' weights live: on the compute device, or in host memory between their steps.

A one-expert model (Wan2.1 T2V) stays on the device unless the pipeline offloads it. A two-expert model (Wan2.2
A14B: 2 x 28.6 GB in bf16) keeps a host copy of each expert, as the reference does; before a generation the pipeline
asks `both_fit` whether both experts, the other resident weights and one step's working memory fit on the device.
If they do, both go to the device once and stay; if not, only the running expert is on the device: at the switch the
high-noise expert's device copy is freed before the low-noise one is copied up (one host-to-device copy per switch,
none back, since the host copy is kept). An offloading pipeline (T2V or A14B) also frees the last expert's device
copy after the steps, so the text encoder and the VAE never share the device with a DiT.
"""

from __future__ import annotations

import jax
from flax import nnx

# Share of the device's memory the resident weights and one step may plan on: XLA's allocator, fragmentation and the
# VAE decode's own buffers need the rest.
USABLE = 0.9


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (an nnx State, abstract or concrete)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def device_memory_limit(device: jax.Device) -> int | None:
    """The allocator's byte limit of a device (GPUs), or None where the runtime reports none (CPU)."""
    stats = device.memory_stats()
    return None if not stats else stats.get("bytes_limit")


def both_fit(expert_bytes: list[int], other_bytes: int, working_bytes: int, limit: int | None) -> bool:
    """Whether every expert plus the other resident weights (VAE, a kept text encoder) and the working memory of
    the largest stage fit in USABLE of the device's limit; no known limit counts as fitting."""
    return limit is None or sum(expert_bytes) + other_bytes + working_bytes <= USABLE * limit


def host_device() -> jax.Device:
    """Host memory as a jax device: the CPU backend, present on every platform."""
    return jax.devices("cpu")[0]


class ExpertBank:
    """The experts of a pipeline by name ("high", and "low" for two-expert models), each as a graphdef and a state
    on the device, on the host, or both. `device_state(name)` is what a step program takes; `transfers` logs every
    move as (name, "device" | "host") so callers and tests can see the plan at work."""

    def __init__(self, experts: dict[str, nnx.Module], device: jax.Device):
        self.device = device
        self.host = host_device()
        self.graphdefs: dict[str, nnx.GraphDef] = {}
        self._on_device: dict[str, nnx.State | None] = {}
        self._on_host: dict[str, nnx.State | None] = {}
        for name, module in experts.items():
            self.graphdefs[name], state = nnx.split(module)
            where = {d for leaf in jax.tree.leaves(state) for d in leaf.devices()}
            on_device = where == {device}
            self._on_device[name] = state if on_device else None
            self._on_host[name] = None if on_device else jax.device_put(state, self.host)
        self.transfers: list[tuple[str, str]] = []

    @property
    def names(self) -> list[str]:
        return list(self.graphdefs)

    def nbytes(self, name: str) -> int:
        state = self._on_device[name] if self._on_device[name] is not None else self._on_host[name]
        return tree_bytes(state)

    def abstract_state(self, name: str):
        """The expert's state as ShapeDtypeStructs placed on the compute device: what its step program compiles for,
        wherever the weights are now."""
        state = self._on_device[name] if self._on_device[name] is not None else self._on_host[name]
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)

    def on_device(self) -> list[str]:
        return [name for name, state in self._on_device.items() if state is not None]

    def activate(self, name: str, *, keep_others: bool) -> None:
        """Puts expert `name` on the device; unless keep_others, first frees every other expert's device copy."""
        if not keep_others:
            for other in self.on_device():
                if other != name:
                    self.release(other)
        if self._on_device[name] is None:
            self._on_device[name] = jax.device_put(self._on_host[name], self.device)
            self.transfers.append((name, "device"))

    def device_state(self, name: str) -> nnx.State:
        if self._on_device[name] is None:
            raise RuntimeError(f"expert {name!r} is not on the device; activate it first")
        return self._on_device[name]

    def release_all(self) -> None:
        """Frees every expert's device copy (host copies kept)."""
        for name in self.on_device():
            self.release(name)

    def release(self, name: str) -> None:
        """Frees expert `name`'s device copy, keeping (or first making) its host copy."""
        state = self._on_device[name]
        if self._on_host[name] is None:
            self._on_host[name] = jax.device_put(state, self.host)
        self._on_device[name] = None
        if self.device != self.host:  # on a CPU-only machine both copies are the same buffers
            for leaf in jax.tree.leaves(state):
                leaf.delete()
        self.transfers.append((name, "host"))
