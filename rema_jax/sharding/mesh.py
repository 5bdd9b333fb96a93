"""The device mesh: named axes `data`, `fsdp`, `tensor`, sized from a `MeshConfig`.

`data` splits the batch (parameters replicated), `fsdp` splits the batch *and* shards parameters
(ZeRO-3 style: XLA all-gathers each weight where it is used), `tensor` splits heads / MLP width /
vocab (Megatron-style). The product of the three sizes must equal the number of devices; one
size may be -1 ("whatever is left").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from rema_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


class MeshConfigError(ValueError, UserError):
    """The mesh sizes do not fit the available devices (the message says how and what to change)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1 (fill with the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.as_dict()
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1)}
        if bad:
            raise MeshConfigError(f"MeshConfig sizes must be positive ints or -1 (fill), got {bad}")
        fills = [k for k, v in sizes.items() if v == -1]
        if len(fills) > 1:
            raise MeshConfigError(f"MeshConfig: only one axis may be -1 (fill), got {fills} in {sizes}")

    def as_dict(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices` devices (the -1 axis filled); raises `MeshConfigError`."""
        sizes = self.as_dict()
        fixed = math.prod(v for v in sizes.values() if v != -1)
        fill = [k for k, v in sizes.items() if v == -1]
        if fill:
            if num_devices % fixed:
                raise MeshConfigError(
                    f"MeshConfig {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                    f"{num_devices} available devices, so '{fill[0]}=-1' cannot be filled. Choose sizes whose "
                    f"product divides {num_devices}."
                )
            sizes[fill[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise MeshConfigError(
                f"MeshConfig {sizes}: data*fsdp*tensor = {fixed}, but {num_devices} devices are available "
                f"(jax.device_count()). Make the product equal {num_devices}, or set one axis to -1."
            )
        return sizes

    @classmethod
    def from_mapping(cls, d) -> "MeshConfig":
        """From a dict / ml_collections ConfigDict with keys among `data`, `fsdp`, `tensor`."""
        d = dict(d)
        unknown = sorted(set(d) - set(MESH_AXES))
        if unknown:
            raise MeshConfigError(f"mesh config: unknown axes {unknown}; expected keys among {MESH_AXES}")
        return cls(**{k: int(v) for k, v in d.items()})


def make_mesh(config: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A `Mesh` over `devices` (default: all devices of all processes) with axes `MESH_AXES`.

    With the default device list the layout comes from `jax.experimental.mesh_utils`, which puts
    the last (`tensor`) axis on the fastest interconnect (within a host / ICI ring).
    """
    all_devices = devices is None
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if all_devices:
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, AssertionError, NotImplementedError):
            grid = np.asarray(devices, dtype=object).reshape(shape)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_sizes(mesh: Mesh | dict[str, int]) -> dict[str, int]:
    """Axis name → size for a `Mesh` or an already-plain dict (used by memory planning without devices)."""
    if isinstance(mesh, Mesh):
        return dict(mesh.shape)
    return {a: int(mesh.get(a, 1)) for a in MESH_AXES}
